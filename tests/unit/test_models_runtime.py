from types import SimpleNamespace

import torch

from rlhf.models import pad_id, resolve_device, set_torch_threads


def test_pad_id_is_the_pad_token_else_eos_else_zero(tiny_model_dir):
    from rlhf.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    assert pad_id(tok) == tok.pad_token_id
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=7)) == 3
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_auto_device_and_threads():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    before = torch.get_num_threads()
    set_torch_threads(0)  # keeps torch's default
    assert torch.get_num_threads() == before
