"""SPTModel: a stock transformers T5 whose encoder input is ``[P_shared ; P_retrieved ; E(x)]``.

The retrieved memory prompts go in through ``inputs_embeds`` and the attention mask is extended
by their length, so the T5 code itself is untouched (and its FFNs can still be swapped for smile
MoE layers). The retrieval is a soft router over prompts; the MoE routers route tokens over
experts: the two are separate modules and are logged separately (``retrieval_*`` / ``moe_*``).
"""

from __future__ import annotations

import torch
from torch import nn

from smile.models.spt.bank import MemoryBank, PromptRetriever, Retrieval, template_query
from smile.models.spt.config import SPTConfig

BANK_PARAMS = ("retriever.*", "shared_prompt")  # globs of the SPT parameters (own lr group)


class SPTModel(nn.Module):
    """T5ForConditionalGeneration + memory bank + retriever (+ optional task-agnostic prompt)."""

    def __init__(self, backbone: nn.Module, cfg: SPTConfig) -> None:
        super().__init__()
        cfg.validate()
        self.backbone, self.cfg = backbone, cfg
        dim = backbone.config.d_model
        bank = MemoryBank(cfg.bank_size, cfg.prompt_len, dim, cfg.keys, cfg.init_std)
        self.retriever = PromptRetriever(
            bank, cfg.retrieval, cfg.top_k, cfg.temperature, cfg.query_projection
        )
        # Decision (unverified): an extra task-agnostic soft prompt is optional (fixed_prompt_len,
        # default 0): the abstract names only the memory bank as SPT's novel component.
        self.shared_prompt = (
            nn.Parameter(torch.randn(cfg.fixed_prompt_len, dim) * cfg.init_std)
            if cfg.fixed_prompt_len
            else None
        )
        if not cfg.train_backbone:
            backbone.requires_grad_(False)
        self.last_retrieval: Retrieval | None = None

    @property
    def config(self):
        return self.backbone.config

    @property
    def prompt_length(self) -> int:
        """Encoder positions the prompts take: ``fixed_prompt_len + L_m`` (``k·L_m`` for top-k)."""
        return self.cfg.fixed_prompt_len + self.retriever.output_length

    def max_input_length(self) -> int:
        return int(getattr(self.backbone.config, "n_positions", 512))

    def check_length(self, input_length: int) -> None:
        limit = self.max_input_length()
        if self.prompt_length + input_length > limit:
            raise ValueError(
                f"prompt length {self.prompt_length} + input length {input_length} = "
                f"{self.prompt_length + input_length} exceeds the model's maximum {limit} (n_positions)"
            )

    def retrieve(self, embeds: torch.Tensor, attention_mask: torch.Tensor, prompt_token_mask) -> Retrieval:
        """The query comes from the template tokens only (``query_source="template"``); "input"
        pools every input token: the instance-level routing the spec warns about, kept as an
        ablation. The query is detached: retrieval never trains the word embeddings."""
        if self.cfg.query_source == "template":
            if prompt_token_mask is None:
                raise ValueError("batch has no prompt_token_mask, which query_source='template' needs")
            mask = prompt_token_mask * attention_mask
        else:
            mask = attention_mask
        return self.retriever(template_query(embeds.detach(), mask))

    def encoder_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([P ; E(x)], [1…1 ; attention_mask])``; prompts are visible to every real token and
        padded positions stay masked, so padding never attends across."""
        self.check_length(input_ids.shape[1])
        embeds = self.backbone.get_input_embeddings()(input_ids)
        retrieval = self.retrieve(embeds, attention_mask, prompt_token_mask)
        self.last_retrieval = Retrieval(
            retrieval.prompts.detach(), retrieval.alpha.detach(), retrieval.indices
        )
        prompts = retrieval.prompts.to(embeds.dtype)
        if self.shared_prompt is not None:
            shared = self.shared_prompt.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
            prompts = torch.cat([shared, prompts], dim=1)
        if not self.cfg.template_in_input:  # the template feeds the query only, not the encoder
            attention_mask = attention_mask * (1 - prompt_token_mask.to(attention_mask.dtype))
        ones = attention_mask.new_ones(attention_mask.shape[0], prompts.shape[1])
        return torch.cat([prompts, embeds], dim=1), torch.cat([ones, attention_mask], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_token_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
    ):
        embeds, mask = self.encoder_inputs(input_ids, attention_mask, prompt_token_mask)
        return self.backbone(
            inputs_embeds=embeds, attention_mask=mask, labels=labels, decoder_input_ids=decoder_input_ids
        )

    def bank_state_dict(self) -> dict[str, torch.Tensor]:
        """The SPT parameters alone (what setting B carries from GLUE pretraining to SuperGLUE)."""
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith("backbone.")}
