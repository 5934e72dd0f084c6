"""Clients of a running stack: the gateway over HTTP (what a person's browser or an OpenAI
client uses), and the gRPC services for what only they can tell (log-probs, RM, learner).

Endpoints come from `rlhf up`'s up.json in the state folder, or from explicit addresses.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class Endpoints:
    gateway: str = "http://127.0.0.1:8000"
    generator: str = "127.0.0.1:50051"
    reward: str = "127.0.0.1:50052"
    reference: str = "127.0.0.1:50053"
    learner: str = "127.0.0.1:50054"

    @classmethod
    def discover(cls, state_dir: str | Path | None = None, **overrides: str | None) -> "Endpoints":
        """up.json of a running `rlhf up` (in state_dir or the default state folder), else
        the launcher's default ports; any non-None override wins."""
        from rlhf.launcher import default_specs, read_endpoints
        from rlhf.serving.settings import default_state_dir

        specs = read_endpoints(Path(state_dir) if state_dir else default_state_dir()) or default_specs()
        found = {s.name: s.url for s in specs}
        ep = cls(**{k: v for k, v in found.items() if k in cls.__dataclass_fields__})
        for key, value in overrides.items():
            if value:
                setattr(ep, key, value)
        return ep


class GatewayError(RuntimeError):
    pass


class Gateway:
    """The OpenAI-compatible chat API and the feedback API, with retries on 503/504."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0, retries: int = 5):
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries = retries

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Gateway":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, path: str, body: dict) -> dict:
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                r = self.http.post(path, json=body)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise GatewayError(f"POST {path}: {e}") from None
            else:
                if r.status_code < 300:
                    return r.json()
                if r.status_code not in (429, 502, 503, 504) or attempt == self.retries:
                    raise GatewayError(f"POST {path}: HTTP {r.status_code}: {r.text[:300]}")
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    def chat(
        self,
        prompt: str,
        n: int = 1,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> dict:
        """One completion; returns the body (choices with response_id, policy_version)."""
        body: dict = {"model": "default", "messages": [{"role": "user", "content": prompt}], "n": n}
        if max_tokens:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        if seed is not None:
            body["seed"] = seed
        return self._post("/v1/chat/completions", body)

    def rate(self, response_id: str, value: int) -> dict:
        return self._post(
            "/v1/feedback",
            {
                "kind": "rating",
                "response_id": response_id,
                "value": value,
                "source": "simulated",
                "event_id": uuid.uuid4().hex,
            },
        )

    def compare(self, chosen_id: str, rejected_id: str) -> dict:
        return self._post(
            "/v1/feedback",
            {
                "kind": "comparison",
                "chosen_id": chosen_id,
                "rejected_id": rejected_id,
                "source": "simulated",
                "event_id": uuid.uuid4().hex,
            },
        )


def failure(e: BaseException) -> str:
    """One line for a failed call: a gRPC error's code-free details, else the exception's text."""
    details = getattr(e, "details", None)
    return f"{type(e).__name__}: {details() if callable(details) else e}"
