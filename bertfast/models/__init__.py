"""The four encoders and their pretraining heads; one file per model, shared blocks in layers.py."""

from bertfast.models.albert import (AlbertConfig, AlbertForMaskedLM, AlbertForPreTraining, AlbertModel,
                                    set_layer_loop)
from bertfast.models.bert import BertConfig, BertForPreTraining, BertModel
from bertfast.models.electra import (ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining, ElectraModel,
                                     ElectraPretrainingModel, make_generator_config)
from bertfast.models.layers import set_unpad
from bertfast.models.roberta import RobertaConfig, RobertaForMaskedLM, RobertaModel

__all__ = [
    "BertConfig", "BertModel", "BertForPreTraining",
    "AlbertConfig", "AlbertModel", "AlbertForPreTraining", "AlbertForMaskedLM",
    "RobertaConfig", "RobertaModel", "RobertaForMaskedLM",
    "ElectraConfig", "ElectraModel", "ElectraForPreTraining", "ElectraForMaskedLM", "ElectraPretrainingModel",
    "make_generator_config", "set_unpad", "set_layer_loop",
]
