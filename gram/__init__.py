"""gram: the GRAM method in pure PyTorch (no Ray, no MLflow, no boto3).

Public API:
    volume(*embeddings, mask=None, normalize=True) -> [B]
    volume_matrix(anchor, *others, mask=None, normalize=True) -> [Na, Nb]
    GramLoss, CosineInfoNCELoss, build_loss
    all_gather_with_grad, all_gather_no_grad
    retrieval_metrics, retrieval_ranks, rank_summary, score_matrix
    class_embeddings, zero_shot_classify
    ShardInfo, ShardLoader, plan_epoch (per-rank shard streaming)

Model (see docs/model.md):
    ModelConfig, model_config(name), list_model_configs()
    GramModel, build_model(cfg), gram_tiny(), gram_tiny_minilm(), gram_base()
    load_weights, save_checkpoint, load_checkpoint
    DecodeConfig, decode_sample, SampleDecoder, SampleError, collate, Collator, SyntheticClips
    OptimConfig, build_optimizer, cosine_schedule, train_step, evaluate
"""

from gram import retrieval
from gram.classification import ClassificationResult, class_embeddings, zero_shot_classify
from gram.decode import (
    Collator,
    DecodeConfig,
    SampleDecoder,
    SampleError,
    collate,
    decode_sample,
)
from gram.distributed import all_gather_no_grad, all_gather_with_grad
from gram.loss import CosineInfoNCELoss, GramLoss, build_loss
from gram.model import (
    GramModel,
    build_model,
    count_parameters,
    gram_base,
    gram_tiny,
    gram_tiny_minilm,
)
from gram.model_config import ModelConfig, list_model_configs, model_config
from gram.retrieval import rank_summary, retrieval_metrics, retrieval_ranks, score_matrix
from gram.shards import ShardInfo, ShardLoader, plan_epoch
from gram.steps import (
    OptimConfig,
    build_optimizer,
    cosine_schedule,
    evaluate,
    train_step,
)
from gram.synthetic import SyntheticClips
from gram.volume import volume, volume_matrix
from gram.weights import load_checkpoint, load_weights, save_checkpoint

__version__ = "0.1.0"

__all__ = [
    "ClassificationResult",
    "Collator",
    "CosineInfoNCELoss",
    "DecodeConfig",
    "GramLoss",
    "GramModel",
    "ModelConfig",
    "OptimConfig",
    "SampleDecoder",
    "SampleError",
    "ShardInfo",
    "ShardLoader",
    "SyntheticClips",
    "__version__",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "build_loss",
    "build_model",
    "build_optimizer",
    "class_embeddings",
    "collate",
    "cosine_schedule",
    "count_parameters",
    "decode_sample",
    "evaluate",
    "gram_base",
    "gram_tiny",
    "gram_tiny_minilm",
    "list_model_configs",
    "load_checkpoint",
    "load_weights",
    "model_config",
    "plan_epoch",
    "rank_summary",
    "retrieval",
    "retrieval_metrics",
    "retrieval_ranks",
    "save_checkpoint",
    "score_matrix",
    "train_step",
    "volume",
    "volume_matrix",
    "zero_shot_classify",
]
