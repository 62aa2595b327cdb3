"""The jigsaw-puzzle loss head: predict which tile permutation shuffled each image."""

from __future__ import annotations

from sesemi.models.heads.loss import TransformationPredictionLossHead


class JigsawPredictionLossHead(TransformationPredictionLossHead):
    """Classifies each jigsaw puzzle by the index of the permutation that shuffled its tiles.

    Reads `(images (B, C, H, W), permutation indices (B,))` batches as made by
    `sesemi.collation.JigsawTransformer`; a linear layer on the backbone's pooled features
    predicts the index, and each puzzle's cross-entropy is returned. `num_permutations` must
    equal the collation's (the first batch is checked). Logs `top1`, the share of puzzles solved.

    References: Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving
    Jigsaw Puzzles", arXiv:1603.09246; JiGen (Carlucci et al., arXiv:1903.06864) trains the
    reassembled-image puzzle jointly with the supervised loss, as here. Deviations from Noroozi &
    Favaro: one forward pass over the reassembled image through the shared backbone and a
    single linear classifier, instead of a per-tile siamese network with concatenated tile
    features and fully connected layers (see `sesemi.collation.JigsawTransformer`).
    """

    argument = "num_permutations"
    collation = "JigsawTransformer"

    def __init__(
        self, input_data: str, input_backbone: str = "backbone", num_permutations: int = 24
    ) -> None:
        """Initializes the head.

        Args:
            input_data: The loader name of the puzzle batches.
            input_backbone: The backbone to extract features with.
            num_permutations: The size of the collation's permutation set.
        """
        super().__init__(input_data, input_backbone, num_permutations)
