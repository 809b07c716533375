"""Backends: what turns prompts into text. Each has ``generate(prompts, max_new_tokens, stop)``
(greedy, temperature 0) returning one string per prompt, without the prompt.

* :class:`HFCausalBackend`: a local transformers causal LM (batched, left padding). With ``moe``
  (the :class:`~smile.moe.MoEConfig` it was trained with) a smile MoE export loads into the same
  skeleton made MoE by :func:`smile.hf.moefy`, and per-task expert loads are counted.
* :class:`HFSeq2SeqBackend`: a local encoder-decoder LM (T5 family).
* :class:`OpenAICompatBackend`: any OpenAI-compatible HTTP endpoint (chat or completions).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from smile.moe import MoEConfig


class Backend(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """One greedy continuation per prompt, cut at the first stop string."""


class EndpointError(ConnectionError):
    """An HTTP endpoint that could not answer after the configured attempts (names the URL)."""


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string (API backends stop there themselves)."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def _check_model_dir(path: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json (a from_pretrained directory)")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
        raise FileNotFoundError(
            f"model directory {path} has no tokenizer (tokenizer.json / tokenizer_config.json): "
            "save the tokenizer next to the weights"
        )
    return folder


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class _HFBackend:
    """Shared loading and batching of the local transformers backends."""

    padding_side = "right"

    def __init__(
        self,
        path: str,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str = "auto",
        moe: MoEConfig | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        folder = _check_model_dir(path)
        self.name = folder.name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.tokenizer.padding_side = self.padding_side
        self.tokenizer.truncation_side = "left"  # keep the question's end and the trigger
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = self._load(folder, moe).to(self.device, _dtype(dtype, self.device)).eval()
        self._load_counts: dict[str, torch.Tensor] = {}
        self._hook_moe_layers()

    def _auto_class(self) -> Any:
        raise NotImplementedError

    def _load(self, folder: Path, moe: MoEConfig | None) -> torch.nn.Module:
        from transformers import AutoConfig

        info = folder / "smile_export.json"
        has_experts = info.is_file() and json.loads(info.read_text()).get("expert_parameters")
        if moe is None:
            if has_experts:
                raise ValueError(
                    f"{folder} is a smile MoE export: set model.moe to the MoE config it was trained with"
                )
            return self._auto_class().from_pretrained(str(folder), local_files_only=True)
        from smile.hf import moefy
        from smile.runtime import load_weights

        model = self._auto_class().from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
        moefy(model, moe)
        load_weights(model, folder)
        return model

    def _hook_moe_layers(self) -> None:
        """Count the tokens each expert receives in every forward (generation runs many)."""
        from smile.hf import moe_modules

        def count(name: str):
            def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
                stats = module.moe.last_stats
                if stats is not None:
                    seen = stats.tokens_per_expert.detach().to("cpu", torch.long)
                    self._load_counts[name] = self._load_counts.get(name, 0) + seen

            return hook

        for name, module in moe_modules(self.model):
            module.register_forward_hook(count(name))

    def take_expert_load(self) -> dict[str, list[int]] | None:
        """Tokens routed to each expert per MoE layer since the last call (None: a dense model).
        Left-padding tokens of a batch are routed too and counted."""
        if not self._load_counts:
            return None
        counts = {name: [int(x) for x in c] for name, c in sorted(self._load_counts.items())}
        self._load_counts.clear()
        return counts

    def _max_input(self, max_new_tokens: int) -> int | None:
        limit = getattr(self.model.config, "n_positions", None) or getattr(
            self.model.config, "max_position_embeddings", None
        )
        return None if limit is None else max(1, limit - max_new_tokens)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = list(prompts[start : start + self.batch_size])
            max_len = self._max_input(max_new_tokens)
            enc = self.tokenizer(
                batch, return_tensors="pt", padding=True, truncation=max_len is not None, max_length=max_len
            ).to(self.device)
            tokens = self.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new = self._new_tokens(tokens, enc["input_ids"].shape[1])
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            out.extend(cut_at_stop(t, stop).strip() for t in texts)
        return out

    def _new_tokens(self, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
        return tokens


class HFCausalBackend(_HFBackend):
    """A local causal LM; prompts are left-padded so every continuation starts at the same place."""

    padding_side = "left"

    def _auto_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def _new_tokens(self, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
        return tokens[:, prompt_len:]


class HFSeq2SeqBackend(_HFBackend):
    """A local encoder-decoder LM: the prompt is the encoder input, the decoder output the answer."""

    def _auto_class(self) -> Any:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM


class OpenAICompatBackend:
    """An OpenAI-compatible endpoint (``api``: "chat" -> /chat/completions, one user message;
    "completions" -> /completions). Temperature 0; a request that fails to connect, times out or
    gets a 429/5xx is retried ``max_retries`` times with exponential backoff, then raises
    :class:`EndpointError` naming the URL. The key is read from the ``api_key_env`` variable."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api: str = "chat",
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        api_key_env: str = "OPENAI_API_KEY",
    ) -> None:
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        if max_retries < 0 or timeout_s <= 0:
            raise ValueError(f"max_retries must be >= 0 and timeout_s > 0, got {max_retries}, {timeout_s}")
        self.url = base_url.rstrip("/") + ("/chat/completions" if api == "chat" else "/completions")
        self.name, self.model, self.api = model.replace("/", "_"), model, api
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.api_key = os.environ.get(api_key_env, "")

    def _body(self, prompt: str, max_new_tokens: int, stop: Sequence[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "temperature": 0, "max_tokens": max_new_tokens}
        if stop:
            body["stop"] = list(stop)[:4]  # the API takes at most four
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        reason = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                if err.code != 429 and err.code < 500:
                    detail = err.read().decode(errors="replace")[:200]
                    raise EndpointError(f"{self.url} refused the request: HTTP {err.code} {detail}") from None
                reason = f"HTTP {err.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                reason = str(getattr(err, "reason", err))
        raise EndpointError(f"{self.url} unreachable after {self.max_retries + 1} attempts: {reason}")

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        out = []
        for prompt in prompts:
            choice = self._post(self._body(prompt, max_new_tokens, stop))["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
            out.append(cut_at_stop(text or "", stop).strip())
        return out
