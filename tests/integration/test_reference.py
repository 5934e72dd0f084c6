"""ReferenceModel and the reference service: log-probs equal a direct forward pass of the
same (tiny) model; LogProbs batches concurrent calls and refuses oversized input."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from rlhf.models import load_causal_lm, sequence_logprobs
from rlhf.reference import ReferenceModel
from rlhf.serving.client import sync_channel
from rlhf.v1 import reference_pb2, reference_pb2_grpc
from tests.procs import run_service


def random_batch(seed: int, n: int, vocab: int = 49152) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 24, (n, 2), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (p,), generator=g).tolist() for p, _ in lengths]
    responses = [torch.randint(0, vocab, (r,), generator=g).tolist() for _, r in lengths]
    responses[0] = []  # an empty response is legal: no log-probs
    return prompts, responses


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


def test_exact_batching_is_bitwise_equal_to_one_by_one(tiny_model_dir, direct):
    prompts, responses = random_batch(0, 12)
    prompts[3], responses[3] = prompts[2], responses[2][:1] + [5] * (len(responses[2]) - 1)  # a same-length group
    ref = ReferenceModel(tiny_model_dir, batching="exact")
    for got, p, r in zip(ref.logprobs(prompts, responses), prompts, responses):
        assert torch.equal(got, sequence_logprobs(direct, p, r))


def test_padded_batching_matches_to_float_rounding(tiny_model_dir, direct):
    prompts, responses = random_batch(1, 12)
    ref = ReferenceModel(tiny_model_dir, batching="padded", max_batch_tokens=64)  # several chunks
    for got, p, r in zip(ref.logprobs(prompts, responses), prompts, responses):
        assert got.shape == (len(r),)
        assert torch.allclose(got, sequence_logprobs(direct, p, r), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def reference_service(tiny_model_dir, tmp_path_factory):
    env = {
        "RLHF_MODEL": str(tiny_model_dir),
        "RLHF_REFERENCE_MAX_ITEMS": "16",
        "RLHF_REFERENCE_MAX_TOKENS": "64",
        "RLHF_REFERENCE_TORCH_THREADS": "1",
    }
    with run_service("reference", tmp_path_factory.mktemp("reference"), env=env) as svc:
        yield svc


def log_probs(address: str, prompts, responses) -> list[torch.Tensor]:
    with sync_channel(address) as ch:
        resp = reference_pb2_grpc.ReferenceServiceStub(ch).LogProbs(
            reference_pb2.LogProbsRequest(
                items=[
                    reference_pb2.LogProbsItem(prompt_token_ids=p, response_token_ids=r)
                    for p, r in zip(prompts, responses)
                ]
            ),
            timeout=60,
        )
    return [torch.tensor(list(x.logprobs), dtype=torch.float32) for x in resp.results]


def test_service_log_probs_equal_a_direct_forward_pass(reference_service, direct):
    prompts, responses = random_batch(2, 10)
    got = log_probs(reference_service.address, prompts, responses)
    for g, p, r in zip(got, prompts, responses):
        assert torch.equal(g, sequence_logprobs(direct, p, r))


def test_concurrent_calls_are_batched_and_each_answer_is_its_own(reference_service, direct):
    batches = [random_batch(10 + i, 3) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: log_probs(reference_service.address, *b), batches))
    for (prompts, responses), got in zip(batches, answers):
        for g, p, r in zip(got, prompts, responses):
            assert torch.equal(g, sequence_logprobs(direct, p, r))


def test_get_info(reference_service, tiny_model_dir):
    with sync_channel(reference_service.address) as ch:
        info = reference_pb2_grpc.ReferenceServiceStub(ch).GetInfo(reference_pb2.ReferenceInfoRequest(), timeout=10)
    assert info.model == str(tiny_model_dir.resolve()) and info.max_model_len == 64


@pytest.mark.parametrize(
    "items, field",
    [
        ([([1], [2])] * 17, "items: 17 items > limit 16"),
        (
            [([1, 2], [3]), ([1] * 40, [2] * 25)],
            "items[1]: prompt_token_ids + response_token_ids = 65 tokens > limit 64",
        ),
        ([([], [3])], "items[0].prompt_token_ids: empty"),
        ([([1], [49152])], "items[0].response_token_ids: token ids must be in [0, 49152)"),
        ([([-1], [2])], "items[0].prompt_token_ids: token ids must be in [0, 49152)"),
    ],
)
def test_oversized_or_malformed_input_is_invalid_argument(reference_service, items, field):
    with pytest.raises(grpc.RpcError) as e:
        log_probs(reference_service.address, [p for p, _ in items], [r for _, r in items])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()
