"""``missrec_ranking``: full-ranking HR / Recall / NDCG / MRR as a Hugging Face ``evaluate`` metric.

A thin wrapper around :mod:`modeling_missrec.metrics` so that ``evaluate.load`` users get exactly the numbers
the MISSRec trainer reports. Load it offline with::

    from modeling_missrec.metrics import EVALUATE_MODULE_PATH
    metric = evaluate.load(EVALUATE_MODULE_PATH)

It needs the full ``[num_users, num_items + 1]`` score matrix, so it suits small catalogues and tests; for
large catalogues use ``modeling_missrec.metrics.streaming_ranks`` with ``RankingMetrics``.
"""

import datasets
import evaluate
import numpy as np
import torch

from modeling_missrec.metrics import metrics_from_ranks, reference_ranks

_DESCRIPTION = """\
Full-ranking evaluation for sequential recommendation. Each user has one target item; the target's rank is
1 + the number of other real items scored at least as high (ties count against the target). Item id 0 is
padding and is never ranked. Reports HR@K, Recall@K (equal to HR@K with one target), NDCG@K for each K, MRR
(no cut-off) and the number of users.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list` of `list` of `float`): for each user, the scores of item ids 0..num_items
        (column 0 is padding and ignored). Every row must have the same length.
    references (`list` of `int`): for each user, the target item id in 1..num_items.
    ks (`tuple` of `int`, defaults to `(10, 50)`): cut-offs for HR, Recall and NDCG.
    metric_cutoff_offset (`int`, defaults to 0): the cut-off actually used is K + offset while the key stays
        `@K`. Offset 1 reproduces the original MISSRec code, whose "@10" numbers were HR@11.
Returns:
    `dict` with `hr@K`, `recall@K`, `ndcg@K` for each K, `mrr` and `num_users`.
Examples:
    >>> metric = evaluate.load(EVALUATE_MODULE_PATH)
    >>> metric.compute(predictions=[[0.0, 0.9, 0.1, 0.5]], references=[3], ks=[2])
    {'hr@2': 1.0, 'recall@2': 1.0, 'ndcg@2': 0.6309297535714575, 'mrr': 0.5, 'num_users': 1}
"""

_CITATION = """\
@inproceedings{wang2023missrec,
  title     = {MISSRec: Pre-training and Transferring Multi-modal Interest-aware Sequence Representation
               for Recommendation},
  author    = {Wang, Jinpeng and Zeng, Ziyun and others},
  booktitle = {Proceedings of the 31st ACM International Conference on Multimedia},
  year      = {2023},
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MissrecRanking(evaluate.Metric):
    """Full-ranking metrics over item ids 1..num_items (see module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Value("int64"),
                }
            ),
            codebase_urls=["https://github.com/gimpong/MM23-MISSRec"],
            reference_urls=["https://arxiv.org/abs/2308.11175"],
        )

    def _compute(
        self,
        predictions: list[list[float]],
        references: list[int],
        ks: tuple[int, ...] = (10, 50),
        metric_cutoff_offset: int = 0,
    ) -> dict[str, float]:
        lengths = {len(row) for row in predictions}
        if len(lengths) != 1:
            raise ValueError(
                "predictions must hold one row per user scoring item ids 0..num_items, all the same length; "
                f"got {len(predictions)} row(s) with lengths {sorted(lengths)}"
            )
        scores = torch.from_numpy(np.stack([np.asarray(row, dtype=np.float64) for row in predictions]))
        targets = torch.from_numpy(np.asarray(references, dtype=np.int64))
        ranks = reference_ranks(scores, targets)
        return metrics_from_ranks(ranks, ks=ks, metric_cutoff_offset=metric_cutoff_offset)
