"""gram: the GRAM method in pure PyTorch (no Ray, no MLflow, no boto3).

Public API:
    volume(*embeddings, mask=None, normalize=True) -> [B]
    volume_matrix(anchor, *others, mask=None, normalize=True) -> [Na, Nb]
    GramLoss, CosineInfoNCELoss, build_loss
    all_gather_with_grad, all_gather_no_grad
    retrieval_metrics, retrieval_ranks, rank_summary, score_matrix
"""

from gram import retrieval
from gram.distributed import all_gather_no_grad, all_gather_with_grad
from gram.loss import CosineInfoNCELoss, GramLoss, build_loss
from gram.retrieval import rank_summary, retrieval_metrics, retrieval_ranks, score_matrix
from gram.volume import volume, volume_matrix

__version__ = "0.1.0"

__all__ = [
    "CosineInfoNCELoss",
    "GramLoss",
    "__version__",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "build_loss",
    "rank_summary",
    "retrieval",
    "retrieval_metrics",
    "retrieval_ranks",
    "score_matrix",
    "volume",
    "volume_matrix",
]
