"""missrec: MISSRec (ACM MM 2023) as HuggingFace models, with data, training and evaluation around them."""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from .configuration_missrec import MissrecConfig
from .modeling_missrec import (
    ItemTokens,
    MissrecForPreTraining,
    MissrecForSequentialRecommendation,
    MissrecModel,
    MissrecModelOutput,
    MissrecPreTrainedModel,
    MissrecSequentialRecommendationOutput,
    MissrecTopKOutput,
)

AutoConfig.register("missrec", MissrecConfig, exist_ok=True)
# AutoModel rebuilds the full recommender (catalogue and fusion head included), like the `auto_map` written by
# `save_pretrained`, so that direct import and `trust_remote_code` give the same class.
AutoModel.register(MissrecConfig, MissrecForSequentialRecommendation, exist_ok=True)
AutoModelForPreTraining.register(MissrecConfig, MissrecForPreTraining, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "ItemTokens",
    "MissrecConfig",
    "MissrecForPreTraining",
    "MissrecForSequentialRecommendation",
    "MissrecModel",
    "MissrecModelOutput",
    "MissrecPreTrainedModel",
    "MissrecSequentialRecommendationOutput",
    "MissrecTopKOutput",
]
