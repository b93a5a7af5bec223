"""Prompt writer on a local instruction-tuned causal LM (hub id or local directory).

The request is the same as the OpenAI writer's, rendered with the tokenizer's chat template;
requests are generated in left-padded batches of ``batch_size``. Sampling is seeded per
request, not per batch: each row draws its own Gumbel noise from a generator seeded by the
request's seed, and greedy decoding over ``logits / temperature`` (top-p filtered) + noise is an
exact sample from the tempered distribution (the Gumbel-max trick). So the same seed gives the
same text whatever the batch it lands in (up to float round-off in padded batches). Answers are
cached like the OpenAI writer's; the model loads only when some request is not cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from magicseg.core.config import TransformersWriterParams
from magicseg.core.errors import BackendError
from magicseg.prompts.base import PromptRequest
from magicseg.prompts.cache import DEFAULT_CACHE_DIR, ResponseCache, cache_key
from magicseg.prompts.parsing import parse_descriptions, request_messages


class TransformersWriter:
    """``write(requests)`` -> one list of at most ``request.n`` descriptions per request.

    ``model``/``tokenizer`` may be passed already built (tests); otherwise both load with
    ``from_pretrained(params.checkpoint)`` on first use.
    """

    name = "transformers"

    def __init__(
        self,
        params: TransformersWriterParams,
        cache_dir: str | Path | None = None,
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        self.params = params
        self.cache = ResponseCache(Path(cache_dir or DEFAULT_CACHE_DIR) / self.name)
        self.model = model
        self.tokenizer = tokenizer
        self._usage = {
            "calls": 0,
            "cache_hits": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "truncated": 0,
        }

    def write(self, requests: Sequence[PromptRequest]) -> list[list[str]]:
        """1. Read cached answers; 2. generate the rest in batches, caching each; 3. parse."""
        msgs = [request_messages(r.classes, r.n) for r in requests]
        keys = [self._key(m, r.seed) for m, r in zip(msgs, requests, strict=True)]
        answers: list[dict[str, Any] | None] = [self.cache.get(k) for k in keys]
        todo = [i for i, a in enumerate(answers) if a is None]
        if todo:
            self._load()
        bs = self.params.batch_size
        for start in range(0, len(todo), bs):
            idx = todo[start : start + bs]
            for i, entry in zip(
                idx,
                self.generate([msgs[i] for i in idx], [requests[i].seed for i in idx]),
                strict=True,
            ):
                self.cache.put(keys[i], entry)
                answers[i] = entry
        self._usage["calls"] += len(todo)
        self._usage["cache_hits"] += len(requests) - len(todo)
        for a in answers:
            self._usage["prompt_tokens"] += a["prompt_tokens"]
            self._usage["completion_tokens"] += a["completion_tokens"]
            self._usage["truncated"] += a["finish_reason"] == "length"
        return [
            parse_descriptions(a["content"], r.n) for a, r in zip(answers, requests, strict=True)
        ]

    def usage(self) -> dict[str, Any]:
        return dict(self._usage, cost_usd=0.0)

    def _key(self, messages: list[dict[str, str]], seed: int) -> str:
        p = self.params
        return cache_key(
            writer=self.name,
            model=p.checkpoint,
            messages=messages,
            seed=seed,
            temperature=p.temperature,
            top_p=p.top_p,
            max_new_tokens=p.max_new_tokens,
            dtype=p.dtype,
        )

    # ---------------------------------------------------------------------------------------
    # model
    # ---------------------------------------------------------------------------------------
    def _load(self) -> None:
        """Load tokenizer and model once (BackendError naming the checkpoint when that fails)."""
        p = self.params
        if self.tokenizer is None or self.model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from magicseg.core.devices import resolve_device, resolve_dtype
            from magicseg.hub import check_model_source

            check_model_source(p.checkpoint, "prompts.transformers.checkpoint")
            device = resolve_device(p.device, "prompts.transformers.device")
            dtype = resolve_dtype(p.dtype, device, "prompts.transformers.dtype")
            try:
                self.tokenizer = self.tokenizer or AutoTokenizer.from_pretrained(p.checkpoint)
                if self.model is None:
                    self.model = AutoModelForCausalLM.from_pretrained(p.checkpoint, dtype=dtype).to(
                        device
                    )
            except (OSError, ValueError) as err:
                raise BackendError(
                    f"prompts.transformers.checkpoint: cannot load {p.checkpoint!r} "
                    f"({str(err).splitlines()[0]})"
                ) from None
        self.model.eval()
        if not getattr(self.tokenizer, "chat_template", None):
            raise BackendError(
                f"prompts.transformers.checkpoint: tokenizer of {p.checkpoint!r} has no chat template "
                "(use an instruction-tuned model)"
            )

    def generate(
        self, messages: Sequence[list[dict[str, str]]], seeds: Sequence[int]
    ) -> list[dict]:
        """One batch: chat-templated prompts, left-padded; returns cache entries
        ({content, prompt_tokens, completion_tokens, finish_reason})."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        tok, model, p = self.tokenizer, self.model, self.params
        # 1. Render the chat template and tokenise, padded on the left.
        texts = [
            tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages
        ]
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: enc[k].to(model.device) for k in ("input_ids", "attention_mask")}
        # 2. Greedy decoding over tempered, top-p filtered logits plus per-row Gumbel noise.
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=p.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos,
        )
        sampler = SeededGumbelSampler(seeds, p.temperature, p.top_p)
        with torch.inference_mode():
            out = model.generate(
                **enc, generation_config=config, logits_processor=LogitsProcessorList([sampler])
            )
        # 3. Decode the new tokens of each row.
        new = out[:, enc["input_ids"].shape[1] :].cpu()
        eos_ids = set([eos] if isinstance(eos, int) else eos or [])
        entries = []
        for row, mask in zip(new.tolist(), enc["attention_mask"].cpu(), strict=True):
            stop = next((j for j, t in enumerate(row) if t in eos_ids), None)
            n_new = len(row) if stop is None else stop + 1
            entries.append(
                {
                    "content": tok.decode(row[:n_new], skip_special_tokens=True).strip(),
                    "finish_reason": "length" if stop is None else "stop",
                    "prompt_tokens": int(mask.sum()),
                    "completion_tokens": n_new,
                }
            )
        return entries


class SeededGumbelSampler:
    """Logits processor: ``(B, T) ids, (B, V) scores -> (B, V)`` scores whose argmax is a sample
    of ``softmax(top_p(scores / temperature))``, each row drawing from its own seeded generator
    (one draw of V uniforms per step, so a row's sample does not depend on the batch)."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        import torch

        self.temperature = temperature
        self.top_p = top_p
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            drop = cum - sorted_scores.softmax(-1) > self.top_p  # keep the top token always
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, -float("inf")))
        u = torch.stack(
            [torch.rand(scores.shape[-1], generator=g) for g in self.generators]
        ).clamp_(1e-20, 1.0)
        gumbel = -torch.log(-torch.log(u)).to(scores.device)
        return scores + gumbel
