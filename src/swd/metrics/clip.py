"""Prompt alignment: CLIP score, 100 * max(cos(E_image, E_text), 0), averaged over pairs.

The definition is torchmetrics' `CLIPScore` (Hessel et al. 2021 with weight 100). torchmetrics 1.9.0
is not used to compute it, for two reasons: its `model_name_or_path` accepts only a few hub names
(a local CLIP directory is refused), and with transformers 5 it breaks, because
`CLIPModel.get_image_features` now returns an output object rather than the embedding tensor
torchmetrics normalises. So the same steps are done here with transformers' `CLIPModel` and
`CLIPProcessor` (the embeddings are the projected pooled outputs). One difference: torchmetrics
floors the *mean* at 0, this floors each pair, as its documented formula says; with real CLIP
models image-text cosines are positive and both agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import CLIPModel, CLIPProcessor

from swd.config import is_hub_id
from swd.data import to_uint8


class CLIPScorer:
    """A CLIP model and its processor, loaded once from a local directory or a hub id."""

    def __init__(self, name_or_path: str | Path, device: str | torch.device = "cpu") -> None:
        path = Path(name_or_path)
        if not is_hub_id(name_or_path) and not (path / "config.json").is_file():
            raise FileNotFoundError(f"eval.clip={name_or_path} is not a CLIP directory (no config.json) nor a hub id; "
                                    "give a directory written by CLIPModel.save_pretrained or a hub id like openai/clip-vit-large-patch14")
        self.model = CLIPModel.from_pretrained(str(name_or_path)).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(name_or_path))
        self.device = torch.device(device)

    @torch.no_grad()
    def embeddings(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Unit-norm CLIP embeddings of images (N, C, H, W) in [-1, 1] and of N prompts: (N, D) each."""
        pixels = to_uint8(images).expand(-1, 3, -1, -1).cpu()  # (N, 3, H, W) uint8, as an image file stores it
        inputs = self.processor(text=list(prompts), images=list(pixels), return_tensors="pt", padding=True, truncation=True)
        image = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)).pooler_output  # (N, D)
        text = self.model.get_text_features(input_ids=inputs["input_ids"].to(self.device),
                                            attention_mask=inputs["attention_mask"].to(self.device)).pooler_output  # (N, D)
        return F.normalize(image.float(), dim=-1).cpu(), F.normalize(text.float(), dim=-1).cpu()

    def pair_scores(self, images: Tensor, prompts: Sequence[str], batch_size: int = 100) -> Tensor:
        """(N,) CLIP score of each image with its prompt: 100 * max(cos, 0)."""
        if len(images) != len(prompts):
            raise ValueError(f"CLIP score pairs images with prompts: got {len(images)} images and {len(prompts)} prompts")
        cosines = []
        for start in range(0, len(images), batch_size):
            image, text = self.embeddings(images[start : start + batch_size], prompts[start : start + batch_size])
            cosines.append((image * text).sum(dim=-1))  # (B,)
        return clip_score_of(torch.cat(cosines))

    def score(self, images: Tensor, prompts: Sequence[str], batch_size: int = 100) -> float:
        """Mean CLIP score of image i with prompt i, in [0, 100]."""
        return float(self.pair_scores(images, prompts, batch_size).mean())


def clip_score_of(cosines: Tensor) -> Tensor:
    """CLIP score of each pair from its cosine similarity: 100 * max(cos, 0)."""
    return 100 * cosines.clamp(min=0)
