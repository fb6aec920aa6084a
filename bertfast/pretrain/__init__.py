"""Pretraining of BERT, ALBERT, RoBERTa and ELECTRA on a local corpus (`bertfast pretrain`)."""
