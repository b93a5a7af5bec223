"""Prompt writer for any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama,
llama.cpp server) through the official ``openai`` client.

Every response is cached on disk (``ResponseCache``) before it is parsed, so a re-run costs no
call and a crashed stage resumes where it stopped. The client runs with ``max_retries=0``; this
module retries rate limits (429), server errors (5xx), timeouts, dropped connections and
malformed bodies itself, with exponential backoff from ``base_delay`` (honouring
``Retry-After`` up to ``max_delay``). The API key comes from the environment variable named by
``api_key_env`` and is never written to a cache entry, a log or an error message.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from magicseg.core.config import OpenAIWriterParams
from magicseg.core.errors import BackendError
from magicseg.prompts.base import PromptRequest
from magicseg.prompts.cache import DEFAULT_CACHE_DIR, ResponseCache, cache_key
from magicseg.prompts.parsing import (
    counterfactual_messages,
    parse_descriptions,
    parse_rewrite,
    request_messages,
)

SEED_MOD = 2**31  # servers differ in the seed range they accept; int32 is safe everywhere


class OpenAIWriter:
    """``write(requests)`` -> one list of at most ``request.n`` descriptions per request.

    ``usage()`` reports tokens and cost over all responses the run used (cached included, so
    the figure is the dataset's cost and is the same on a re-run) and how many were live calls.
    """

    name = "openai"

    def __init__(
        self,
        params: OpenAIWriterParams,
        cache_dir: str | Path | None = None,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
    ) -> None:
        self.params = params
        self.cache = ResponseCache(Path(cache_dir or DEFAULT_CACHE_DIR) / self.name)
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.llm_counterfactual = params.llm_counterfactual
        self._client: Any = None
        self._lock = threading.Lock()
        self._usage = {
            "calls": 0,
            "cache_hits": 0,
            "retries": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "truncated": 0,
            "short": 0,
        }

    # ---------------------------------------------------------------------------------------
    # the protocol
    # ---------------------------------------------------------------------------------------
    def write(self, requests: Sequence[PromptRequest]) -> list[list[str]]:
        """Descriptions per request, parsed from the (cached or live) answers."""
        jobs = [(request_messages(r.classes, r.n), r.seed) for r in requests]
        answers = self._complete(jobs)
        out = []
        for req, answer in zip(requests, answers, strict=True):
            texts = parse_descriptions(answer["content"], req.n)
            with self._lock:
                self._usage["short"] += len(texts) < req.n
            out.append(texts)
        return out

    def rewrite_counterfactuals(
        self, items: Sequence[tuple[str, Sequence[str], int]]
    ) -> list[str | None]:
        """LLM counterfactual of each ``(description, classes, seed)``; None when it gave none."""
        jobs = [(counterfactual_messages(text, classes), seed) for text, classes, seed in items]
        return [parse_rewrite(a["content"]) for a in self._complete(jobs)]

    def usage(self) -> dict[str, Any]:
        u = dict(self._usage)
        p = self.params
        cost = u["prompt_tokens"] / 1000 * p.price_per_1k_input
        cost += u["completion_tokens"] / 1000 * p.price_per_1k_output
        u["cost_usd"] = round(cost, 6)
        return u

    # ---------------------------------------------------------------------------------------
    # calls, cache, retries
    # ---------------------------------------------------------------------------------------
    def _key(self, messages: list[dict[str, str]], seed: int) -> str:
        p = self.params
        return cache_key(
            writer=self.name,
            model=p.llm,
            messages=messages,
            seed=seed % SEED_MOD,
            temperature=p.temperature,
            max_tokens=p.max_tokens,
        )

    def _complete(self, jobs: Sequence[tuple[list[dict[str, str]], int]]) -> list[dict[str, Any]]:
        """Answer entries ({content, finish_reason, prompt_tokens, completion_tokens}) per job.

        1. Cached answers are read; 2. the rest go to the server, at most ``concurrency`` at
        once, each cached as soon as it arrives; 3. the first request that fails for good stops
        the queue (in-flight requests finish and are cached) and raises BackendError.
        """
        keys = [self._key(m, s) for m, s in jobs]
        answers: list[dict[str, Any] | None] = [self.cache.get(k) for k in keys]
        todo = [i for i, a in enumerate(answers) if a is None]
        if todo:
            self._connect()
            pool = ThreadPoolExecutor(max_workers=self.params.concurrency)
            futures = {pool.submit(self._call, *jobs[i]): i for i in todo}
            try:
                for fut in futures:  # in submission order; the first error cancels the rest
                    i = futures[fut]
                    answers[i] = fut.result()
                    self.cache.put(keys[i], answers[i])
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                done, _ = wait([f for f in futures if not f.cancelled()])
                for fut in done:  # keep what did arrive
                    if not fut.cancelled() and fut.exception() is None:
                        self.cache.put(keys[futures[fut]], fut.result())
                raise
            pool.shutdown()
        with self._lock:
            self._usage["cache_hits"] += len(jobs) - len(todo)
            for a in answers:
                self._usage["prompt_tokens"] += a["prompt_tokens"]
                self._usage["completion_tokens"] += a["completion_tokens"]
                self._usage["truncated"] += a["finish_reason"] == "length"
        return answers  # type: ignore[return-value]

    def _connect(self) -> None:
        """Build the client once and check key and server before any work (BackendError)."""
        if self._client is None:
            self._client, _ = open_client(self.params)

    def _call(self, messages: list[dict[str, str]], seed: int) -> dict[str, Any]:
        """One chat completion with retries; returns the cache entry."""
        import openai

        p = self.params
        for attempt in range(p.max_retries + 1):
            retry_after = None
            try:
                resp = self._client.chat.completions.create(
                    model=p.llm,
                    messages=messages,
                    temperature=p.temperature,
                    max_tokens=p.max_tokens,
                    seed=seed % SEED_MOD,
                )
                choice = resp.choices[0]
                content = choice.message.content
                if not isinstance(content, str):
                    raise ValueError("answer without text content")
                with self._lock:
                    self._usage["calls"] += 1
                usage = resp.usage
                return {
                    "content": content,
                    "finish_reason": choice.finish_reason,
                    "prompt_tokens": int(usage.prompt_tokens) if usage else 0,
                    "completion_tokens": int(usage.completion_tokens) if usage else 0,
                    "model": resp.model,
                }
            except (openai.RateLimitError, openai.InternalServerError) as err:
                retry_after = _retry_after(err.response)
                last = f"HTTP {err.status_code}"
            except openai.APIStatusError as err:
                if err.status_code in (408, 409) or err.status_code >= 500:
                    retry_after = _retry_after(err.response)
                    last = f"HTTP {err.status_code}"
                else:  # 400, 401, 403, 404, 422: retrying cannot help
                    raise BackendError(
                        f"prompts.openai: request refused with HTTP {err.status_code} "
                        f"(llm {p.llm!r}): {_short(err.message)}"
                    ) from None
            except openai.APITimeoutError:
                last = f"timeout after {p.timeout_s} s"
            except openai.APIConnectionError:
                last = "connection failed"
            except (openai.APIResponseValidationError, ValueError, TypeError, IndexError) as err:
                last = f"malformed answer ({type(err).__name__})"
            if attempt == p.max_retries:
                break
            with self._lock:
                self._usage["retries"] += 1
            delay = self.base_delay * 2**attempt * (1 + 0.25 * random.random())
            time.sleep(min(self.max_delay, max(delay, retry_after or 0.0)))
        raise BackendError(
            f"prompts.openai: {p.base_url or 'OpenAI API'} failed {p.max_retries + 1} times "
            f"(last: {last}); answers so far are cached, re-run to resume"
        )


def open_client(
    params: OpenAIWriterParams, timeout: float | None = None
) -> tuple[Any, list[str] | None]:
    """An ``openai`` client of ``params.base_url``, checked before any work: the key variable
    is set, and the server answers ``GET /models`` within ``timeout`` seconds (default
    ``params.timeout_s``) and accepts the key. Returns (client, the model ids the server
    lists, or None where it lists none); a one-line BackendError otherwise."""
    try:
        import openai
    except ImportError:
        raise BackendError(
            "prompts.openai: the openai package is not installed (pip install 'magicseg[llm]')"
        ) from None

    p = params
    key = os.environ.get(p.api_key_env)
    if not key:
        raise BackendError(
            f"prompts.openai: environment variable {p.api_key_env} is not set (the API key; "
            "servers without auth accept any value, e.g. EMPTY)"
        )
    where = p.base_url or "the OpenAI API"
    client = openai.OpenAI(api_key=key, base_url=p.base_url, max_retries=0, timeout=p.timeout_s)
    try:
        listed = client.with_options(timeout=timeout or p.timeout_s).models.list()
        models = sorted(m.id for m in listed.data) or None
    except openai.AuthenticationError:
        raise BackendError(f"prompts.openai: {where} rejected the key in {p.api_key_env}") from None
    except (openai.APIConnectionError, openai.InternalServerError) as err:
        raise BackendError(
            f"prompts.openai: cannot reach {where} ({type(err).__name__}); is the server up?"
        ) from None
    except (openai.APIStatusError, openai.APIResponseValidationError):
        models = None  # reachable; some servers do not list models
    return client, models


def _retry_after(response: Any) -> float | None:
    try:
        return float(response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
