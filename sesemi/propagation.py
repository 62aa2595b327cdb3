"""How well an image connects to the labeled images through the unlabeled ones: `predict`'s
`propagation` unknown score.

A model trained with pseudo-labels on an unlabeled folder that holds foreign images (classes
nobody labeled) learns to put them into the known classes with confidence, so its own outputs
(max probability, entropy) stop telling them apart (benchmarks/results/foreign_digits*.md: AUROC
0.6 at 50 % foreign images). Its features still cluster them together, away from the labeled
images. This score reads that structure:

1. The labeled and unlabeled training images' L2-normalized backbone features form a k-nearest
   neighbour graph, `W_ij = max(s_ij, 0)^gamma` for the k most similar j of each i (cosine
   similarity s, gamma = 3), symmetrized, `S = D^-1/2 W D^-1/2` (Iscen et al., "Label
   Propagation for Deep Semi-supervised Learning", CVPR 2019, arXiv:1904.04717).
2. Label mass spreads from the labeled images over the graph: `f = (I - alpha S)^-1 y`, y = 1 on
   labeled images and 0 elsewhere (Zhou et al., "Learning with Local and Global Consistency",
   NeurIPS 2004), solved by the iteration `f <- alpha S f + y`; each image's mass is
   `m_i = f_i / sqrt(d_i)`. Clusters that hold labeled images keep much of it; clusters reached
   from them only through a few weak edges (images of classes nobody labeled) get little.
3. The mass reaching an image to score is the mean of `w_j m_j` over its k nearest training
   images j (the same weights `max(s, 0)^gamma`, not normalized: an image unlike every training
   image gets little too, as one of a cluster nobody labeled does), and its score is the share
   of unlabeled training images (each scored the same way, without itself) with more mass:
   0 = as connected as the best-connected unlabeled images, 0.9 = less connected than 90 % of
   them. `--unknown-threshold 0.5` marks the images less connected than half of the unlabeled
   folder.

Measured (benchmarks/results/foreign_digits_propagation.md, digits, 3 seeds): AUROC 0.913 for
a FlexMatch model with half its unlabeled folder foreign, where its max probability gives 0.636;
0.945 against 0.978 when the folder held no foreign images.

The score needs the images the model trained on; `open_sesemi predict` reads their folders from
the checkpoint's run (or `--labeled` / `--unlabeled`) and scores them with the model once (at
most `MAX_POOL` unlabeled images, a sample seeded by 0 beyond that).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from sesemi.inference import TrainedModel

NEIGHBOURS = 10  # k of the graph and of the queries
GAMMA = 3.0  # the similarity exponent (Iscen et al.)
ALPHA = 0.9  # how far the mass spreads: the iteration keeps alpha of it per hop
ITERATIONS = 200  # alpha^200 < 1e-9: the iteration's remaining error is negligible
MAX_POOL = 20_000  # unlabeled images in the graph at most (predict takes a seeded sample)
SIMILARITIES_AT_ONCE = 2**24  # query x bank similarities computed per chunk (64 MiB)


IDENTICAL = 1.0 - 1e-5  # a query this similar to a training image is that image


def nearest(
    queries: Tensor, bank: Tensor, k: int, skip_self: bool = False, gamma: float = GAMMA
) -> tuple[Tensor, Tensor]:
    """The k most similar bank rows of each query `(Q, k)`: weights `max(s, 0)^gamma` and
    indices, computed in chunks. `skip_self` leaves out each query's own row (the queries are
    the bank, in its order); otherwise a query's best match is left out where the query is
    that training image (cosine similarity >= `IDENTICAL`), so that scoring a training image
    gives what the graph's reference gives it."""
    k = min(k, len(bank) - 1)
    if k < 1:
        raise ValueError("the propagation score needs at least two training images")
    rows = max(1, SIMILARITIES_AT_ONCE // max(1, len(bank)))
    weights, indices = [], []
    for start in range(0, len(queries), rows):
        sims = queries[start : start + rows] @ bank.T
        if skip_self:
            own = torch.arange(start, start + len(sims), device=sims.device)
            sims[torch.arange(len(sims)), own] = float("-inf")
            top = sims.topk(k, dim=1)
        else:  # k + 1 candidates: without the first where it is the query itself
            top = sims.topk(k + 1, dim=1)
            itself = (top.values[:, :1] >= IDENTICAL).expand(-1, k)
            keep = torch.arange(k, device=sims.device)
            top = (
                torch.where(itself, top.values[:, 1:], top.values[:, keep]),
                torch.where(itself, top.indices[:, 1:], top.indices[:, keep]),
            )
        values, found = top
        weights.append(values.clamp(min=0).pow(gamma))
        indices.append(found)
    return torch.cat(weights), torch.cat(indices)


def labeled_mass(
    features: Tensor,
    labeled: Tensor,
    k: int = NEIGHBOURS,
    alpha: float = ALPHA,
    gamma: float = GAMMA,
) -> Tensor:
    """Each image's label mass `m = f / sqrt(d)` `(N,)` (see the module docstring).

    Args:
        features: L2-normalized features of every training image `(N, D)`.
        labeled: Which of them are labeled `(N,)` bool.
        k: Neighbours per image in the graph.
        alpha: The propagation's damping in (0, 1).
        gamma: The similarity exponent of the graph's weights.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = len(features)
    weights, indices = nearest(features, features, k, skip_self=True, gamma=gamma)
    rows = torch.arange(n).repeat_interleave(weights.shape[1])
    w = torch.sparse_coo_tensor(
        torch.stack([rows, indices.flatten()]),
        weights.flatten().double(),
        (n, n),
        check_invariants=True,
    )
    w = ((w + w.t()) / 2).coalesce()
    degree = torch.sparse.sum(w, dim=1).to_dense()
    scale = torch.where(degree > 0, degree.clamp(min=1e-300).rsqrt(), torch.zeros_like(degree))
    i, j = w.indices()
    s = torch.sparse_coo_tensor(
        w.indices(), w.values() * scale[i] * scale[j], (n, n), check_invariants=True
    )
    y = labeled.double().unsqueeze(1)
    f = y.clone()
    for _ in range(ITERATIONS):
        f = alpha * torch.sparse.mm(s, f) + y
    return (f.squeeze(1) * scale).float()


def query_mass(weights: Tensor, indices: Tensor, mass: Tensor) -> Tensor:
    """The mass reaching each query through its k nearest training images `(Q,)`: the mean of
    `weight_j * m_j` over them (not normalized by the weights, so that an image far from every
    training image gets little, too)."""
    return (weights * mass[indices]).mean(dim=1)


@dataclass
class PropagationScorer:
    """The fitted training graph: `score(features)` gives each image's unknown score.

    Attributes:
        bank: The training images' normalized features `(N, D)`, labeled ones first.
        mass: Their label mass `(N,)`.
        reference: The unlabeled training images' own query mass, sorted `(U,)`.
        labeled: How many labeled images the bank starts with.
        k, gamma: Neighbours per image and similarity exponent, of the graph and the queries.
    """

    bank: Tensor
    mass: Tensor
    reference: Tensor
    labeled: int
    k: int = NEIGHBOURS
    gamma: float = GAMMA

    @classmethod
    def fit(
        cls,
        labeled: Tensor,
        unlabeled: Tensor,
        k: int = NEIGHBOURS,
        alpha: float = ALPHA,
        gamma: float = GAMMA,
    ) -> PropagationScorer:
        """Builds the graph from the labeled `(L, D)` and unlabeled `(U, D)` features (`k`,
        `alpha`, `gamma`: as in `labeled_mass`; the defaults are what `predict` uses)."""
        if len(labeled) == 0:
            raise ValueError("the propagation score needs labeled images (--labeled DIR)")
        if len(unlabeled) == 0:
            raise ValueError("the propagation score needs unlabeled images (--unlabeled DIR)")
        bank = F.normalize(torch.cat([labeled, unlabeled]).float(), dim=1)
        is_labeled = torch.arange(len(bank)) < len(labeled)
        mass = labeled_mass(bank, is_labeled, k, alpha, gamma)
        weights, indices = nearest(bank, bank, k, skip_self=True, gamma=gamma)
        reference = query_mass(weights, indices, mass)[len(labeled) :]
        return cls(bank, mass, reference.sort().values, len(labeled), k, gamma)

    def masses(self, features: Tensor) -> Tensor:
        """The query mass of images `(Q, D)` (features as the model gives them; a training
        image's own entry is left out)."""
        queries = F.normalize(features.float(), dim=1)
        return query_mass(*nearest(queries, self.bank, self.k, gamma=self.gamma), self.mass)

    def score(self, features: Tensor) -> Tensor:
        """Each image's share of unlabeled training images with more mass `(Q,)`, in [0, 1]
        (ties count half)."""
        mass = self.masses(features)
        below = torch.searchsorted(self.reference, mass, right=False)
        at_most = torch.searchsorted(self.reference, mass, right=True)
        more = len(self.reference) - at_most
        return (more + 0.5 * (at_most - below)) / len(self.reference)


def training_images(checkpoint: str, which: str, folder: str | None = None) -> list[str]:
    """The labeled or unlabeled training images of a checkpoint's run: those in `folder` if
    given, else in the run's folders (`sesemi.suggest.training_folders`)."""
    from sesemi.inference import list_images
    from sesemi.suggest import training_folders

    if folder is not None:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--{which} folder '{folder}' does not exist")
        return list_images([folder])
    folders = training_folders(checkpoint, which)
    if folders is None:
        raise ValueError(
            f"--unknown-score propagation needs the {which} training images, and the run of "
            f"'{checkpoint}' names no {which} image folder that is still there; give "
            f"--{which} DIR"
        )
    return list_images(folders)


def fit_scorer(
    model: TrainedModel,
    labeled: Sequence[str],
    unlabeled: Sequence[str],
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    tta: Sequence[str] = (),
    progress: bool = False,
) -> PropagationScorer:
    """Fits the score on the model's features of its training images (unreadable ones are
    skipped; labeled images among `unlabeled` count as labeled; at most `MAX_POOL` unlabeled
    images, a sample seeded by 0 beyond that)."""
    from sesemi.inference import predict

    known = {os.path.realpath(f) for f in labeled}
    pool = [f for f in unlabeled if os.path.realpath(f) not in known]
    if len(pool) > MAX_POOL:
        keep = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:MAX_POOL]
        pool = [pool[i] for i in sorted(keep.tolist())]
    found = []
    for files in (labeled, pool):
        run = predict(model, list(files), batch_size, workers, device, tta, progress, True)
        rows = [p.features for p in run if p.features is not None]
        found.append(torch.stack(rows) if rows else torch.zeros(0, 1))
    return PropagationScorer.fit(*found)
