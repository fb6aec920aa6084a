"""The pretraining data pipeline: masking, sentence pairs, packing, collators."""
