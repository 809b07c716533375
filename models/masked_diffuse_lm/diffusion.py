"""Masked-Diffuse LM: continuous diffusion over word embeddings with soft-masked noise and a
cross-entropy denoiser (Chen et al., EMNLP 2023).

Forward process: x_0 = emb(w); each token i of bucket b_i is noised as
``x_t^i = sqrt(abar(t, b_i)) x_0^i + sqrt(1 - abar(t, b_i)) eps`` (schedule.py), its bucket given by
its importance in the sentence (importance.py). t is uniform in 1..T. Two objectives:

* ``paper`` (default, §4.3): the output layer f has one class more than the word vocabulary,
  ``[MASK]`` (id ``vocab_size``), and ``L_t = gamma_t CE(f(x_t), d) + CE(f(x_t), d_hat)`` with
  ``gamma_t = (T - t) / T``, d the sentence and d_hat the sentence masked at step t-1 (below).
  The model learns which words are still hidden at t-1 and puts the weight of the true word
  on the words it will write at this step.
* ``ce``: the single CE of the clean words, ``CE(f(x_t), d)`` over the words only (the
  objective used here before the paper's was implemented; its numbers are kept in the README).

"Masked at t-1" for a continuous soft mask (the paper's d_hat comes from discrete masks): a word
is masked in d_hat when its bucket's band has started by step t-1, i.e. ``alpha_bar(t-1, b) < 1``:
from that step on its vector carries noise, which is what the forward process calls masking it
(Table 6 of the paper shows "[mask]" for exactly the words not yet generated). So d_hat = d at
t = 1, and with one bucket every word is [MASK] in d_hat for t >= 2; with m buckets the most
important bucket is masked first.

Sampling starts from noise; at each step the denoiser's distribution over the *words* (the
[MASK] class excluded) gives x0_hat (its expected or argmax embedding), the buckets of the
predicted words, and the re-noised x_{t-1}; the argmax words at t = 0 are the sample. [MASK]
is never emitted: x_0 is a sentence of words ([MASK] has no embedding, it only says "not
written yet at t-1"), and at t = 1 the paper objective's d_hat = d teaches no [MASK] mass, so
the argmax over the words changes nothing the model was trained to put there; re-noising a
[MASK] prediction would spend reverse steps the schedule does not have. ``mbr_samples`` > 1
draws that many candidates per output and keeps the minimum-Bayes-risk one (``mbr_select``).

Decisions where the paper is silent (spec: "unverified"):
* No auxiliary MSE term: the paper's objective is the CE at every step (Eq. 6) and it presents CE
  as the replacement for Diffusion-LM's MSE + rounding loss.
* The word embeddings are learned jointly but used at a fixed scale (each row L2-normalised and
  scaled to sqrt(emb_dim), the norm of Diffusion-LM's N(0, I) initialisation): with CE alone a
  growing embedding norm raises the signal-to-noise ratio at every t and lowers the loss without
  learning anything (Diffusion-LM's MSE term is what anchors it there).
* Lengths: padding is excluded from the loss (spec), so the denoiser never learns where a
  sentence ends; samples draw their length from the train split's length distribution (a buffer,
  saved with the checkpoint) and mask the rest, as Diffusion-LM's infilling masks fixed tokens.
* The paper writes f(X_hat_{t-1}) (the denoised latent); here f reads x_t and the timestep, the
  same network as Diffusion-LM's x_0 predictor, so one forward pass gives both the x_0
  distribution and the d_hat prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from smile.models.masked_diffuse_lm.denoiser import Denoiser
from smile.models.masked_diffuse_lm.importance import buckets, importance
from smile.models.masked_diffuse_lm.schedule import SoftMaskSchedule

X0_MODES = ("expected", "argmax", "hybrid")
OBJECTIVES = ("paper", "ce")
# guidance(x_prev, t_prev, mask) -> x_prev steered toward an attribute (control.py)
Guidance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MaskedDiffuseLM(nn.Module):
    """Embedding + soft-mask schedule + denoiser; the importance statistics and the length
    distribution are buffers, so they travel with the weights."""

    def __init__(
        self,
        denoiser: Denoiser,
        vocab_size: int,
        emb_dim: int,
        T: int,
        n_buckets: int,
        max_len: int,
        schedule: str = "sqrt",
        pretrained_emb: torch.Tensor | None = None,
        objective: str = "paper",
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is not supported; allowed: {', '.join(OBJECTIVES)}")
        classes = vocab_size + (objective == "paper")
        if denoiser.head.out_features != classes:
            raise ValueError(
                f"objective={objective} needs a denoiser head of {classes} classes "
                f"(vocab {vocab_size}{' + [MASK]' if objective == 'paper' else ''}), "
                f"got {denoiser.head.out_features}"
            )
        self.objective, self.vocab_size = objective, vocab_size
        self.mask_id = vocab_size  # the output layer's [MASK] class (objective=paper only)
        self.schedule = SoftMaskSchedule(T, n_buckets, schedule)
        self.T, self.n_buckets, self.max_len, self.emb_dim = T, n_buckets, max_len, emb_dim
        if pretrained_emb is None:
            self.word_emb = nn.Embedding(vocab_size, emb_dim)
            nn.init.normal_(self.word_emb.weight)
        else:  # frozen pretrained-encoder features as x_0 (paper: BERT)
            self.word_emb = nn.Embedding.from_pretrained(pretrained_emb.float(), freeze=True)
        self.denoiser = denoiser
        self.register_buffer("idf", torch.zeros(vocab_size))
        self.register_buffer("entropy", torch.zeros(vocab_size))
        self.register_buffer("length_probs", torch.zeros(max_len + 1))

    def set_statistics(self, idf: torch.Tensor, entropy: torch.Tensor, lengths: Sequence[int]) -> None:
        """Importance statistics and sentence lengths of the train split."""
        with torch.no_grad():
            self.idf.copy_(idf)
            self.entropy.copy_(entropy)
            counts = torch.bincount(torch.tensor(list(lengths)), minlength=self.max_len + 1)[
                : self.max_len + 1
            ]
            self.length_probs.copy_(counts.float() / counts.sum().clamp_min(1))

    # ---- forward process ------------------------------------------------------------------------
    def embeddings(self) -> torch.Tensor:
        """The word vectors x_0 lives on: rows at norm sqrt(emb_dim) (see the module docstring)."""
        return F.normalize(self.word_emb.weight, dim=-1) * self.emb_dim**0.5

    def buckets(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = importance(ids, mask, self.idf, self.entropy)
        return buckets(scores, mask, self.n_buckets)

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor, bucket: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t given x_0, per-token noise levels from the buckets."""
        abar = self.schedule.alpha_bar(t, bucket).to(x0.dtype)[..., None]
        noise = torch.randn_like(x0) if noise is None else noise
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def masked_sentence(
        self, ids: torch.Tensor, t_prev: torch.Tensor, bucket: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """d_hat at step ``t_prev`` (= t - 1): the words whose bucket band has started by then
        (alpha_bar < 1, their vectors carry noise) become [MASK]; the rest, padding included,
        keep their id."""
        masked = (self.schedule.alpha_bar(t_prev, bucket) < 1.0) & mask.bool()
        return torch.where(masked, torch.full_like(ids, self.mask_id), ids)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective (``paper`` or ``ce``) at a uniform t, averaged over non-pad tokens; the
        logged ``ce`` is the words-only CE of d in both, so the two objectives compare on it."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        t = torch.randint(1, self.T + 1, (ids.shape[0],), device=ids.device)
        bucket = self.buckets(ids, mask)
        x_t = self.q_sample(self.embeddings()[ids], t, bucket)
        logits = self.denoiser(x_t, t, mask)
        words = logits[..., : self.vocab_size]
        ce = masked_ce(words, ids, mask)
        if self.objective == "paper":
            gamma = (self.T - t).float() / self.T
            loss = paper_ce(logits, ids, self.masked_sentence(ids, t - 1, bucket, mask), gamma, mask)
        else:
            loss = ce
        acc = ((words.argmax(-1) == ids).float() * mask).sum() / mask.sum().clamp_min(1)
        return loss, {"ce": ce.detach(), "token_acc": acc.detach(), "tokens": mask.sum()}

    # ---- reverse process ------------------------------------------------------------------------
    def sample_lengths(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        probs = self.length_probs.float().cpu()
        if probs.sum() <= 0:
            return torch.full((n,), self.max_len)
        return torch.multinomial(probs, n, replacement=True, generator=generator)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        lengths: torch.Tensor | None = None,
        guidance: Guidance | None = None,
        steps: int | None = None,
        x0_mode: str = "expected",
        mbr_samples: int = 1,
    ) -> torch.Tensor:
        """``n`` sequences (ids, 0 = padding) from x_T ~ N(0, I). ``steps`` < T skips timesteps
        (DDIM-style: re-noise straight to the next kept step); ``guidance`` steers each x_{t-1}.
        ``mbr_samples`` > 1: that many candidates of the same length per output, the
        minimum-Bayes-risk one kept (``mbr_select``)."""
        if x0_mode not in X0_MODES:
            raise ValueError(f"x0_mode={x0_mode!r} is not supported; allowed: {', '.join(X0_MODES)}")
        if mbr_samples < 1:
            raise ValueError(f"mbr_samples={mbr_samples} must be >= 1")
        device = self.word_emb.weight.device
        lengths = self.sample_lengths(n) if lengths is None else lengths
        if mbr_samples > 1:
            candidates = self.sample(
                n * mbr_samples, lengths.repeat_interleave(mbr_samples), guidance, steps, x0_mode
            )
            return mbr_select(candidates.view(n, mbr_samples, -1))
        mask = (torch.arange(self.max_len)[None] < lengths.cpu()[:, None]).long().to(device)
        emb = self.embeddings()  # bf16 under a bf16 engine: the latents follow its dtype
        x = torch.randn(n, self.max_len, self.emb_dim, device=device, dtype=emb.dtype)
        times = timesteps(self.T, steps or self.T)
        ids = torch.zeros(n, self.max_len, dtype=torch.long, device=device)
        for i, t in enumerate(times):
            t_batch = torch.full((n,), t, device=device, dtype=torch.long)
            # the words only: [MASK] (objective=paper) is never written into x0_hat or the sample
            logits = self.denoiser(x, t_batch, mask).float()[..., : self.vocab_size]
            ids = logits.argmax(-1) * mask
            t_prev = times[i + 1] if i + 1 < len(times) else 0
            if t_prev == 0:
                break
            prev = torch.full((n,), t_prev, device=device, dtype=torch.long)
            bucket = self.buckets(ids, mask)
            x0_hat = emb[ids] if x0_mode == "argmax" else logits.softmax(-1).to(emb.dtype) @ emb
            if x0_mode == "hybrid":  # a token clean at t-1 is committed to its argmax word
                clean = self.schedule.alpha_bar(prev, bucket)[..., None] >= 1.0
                x0_hat = torch.where(clean, emb[ids], x0_hat)
            x = self.q_sample(x0_hat, prev, bucket)
            if guidance is not None:
                with torch.enable_grad():
                    x = guidance(x, prev, mask)
        return ids


def timesteps(T: int, steps: int) -> list[int]:
    """``steps`` timesteps from T down to 1, evenly spaced (all of them when steps >= T)."""
    if steps >= T:
        return list(range(T, 0, -1))
    return sorted({max(1, round(T - i * T / steps)) for i in range(steps)}, reverse=True)


def token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position: (B, L, C) logits, (B, L) ids -> (B, L)."""
    return F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")


def masked_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy averaged over the non-padding positions only."""
    mask = mask.float()
    return (token_ce(logits, ids) * mask).sum() / mask.sum().clamp_min(1.0)


def paper_ce(
    logits: torch.Tensor, ids: torch.Tensor, masked_ids: torch.Tensor, gamma: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The paper's L_t = gamma_t CE(f, d) + CE(f, d_hat) (§4.3), per token, averaged over the
    non-padding positions; ``gamma`` (B,) is (T - t) / T of each sentence's t."""
    per_token = gamma.float()[:, None] * token_ce(logits, ids) + token_ce(logits, masked_ids)
    mask = mask.float()
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def mbr_select(candidates: torch.Tensor) -> torch.Tensor:
    """Minimum Bayes risk decoding (Diffusion-LM's choice among samples): (n, k, L) candidate ids
    of the same length per group (0 = padding) -> (n, L), the candidate with the lowest expected
    loss against the other k - 1. The loss is token-level disagreement (the share of positions
    where two candidates differ), not Diffusion-LM's 1 - BLEU: the candidates of one group share
    their length (the sampler fixes it), so positions align, and BLEU-4 is 0 for the short
    sentences this model also writes. Ties go to the earlier candidate."""
    length = (candidates[:, 0] != 0).sum(-1).clamp_min(1).float()  # (n,)
    differ = (candidates[:, :, None, :] != candidates[:, None, :, :]).sum(-1).float()  # (n, k, k)
    risk = differ.sum(-1) / length[:, None]
    return candidates[torch.arange(len(candidates)), risk.argmin(-1)]
