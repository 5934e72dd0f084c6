"""The gateway's PII redactor: each type is replaced by its placeholder and counted, and the
near misses (a 16-digit number failing Luhn, a version string, a time, a code path, an
ordinary number) are left as they were."""

from __future__ import annotations

import pytest

from services.gateway.redact import PLACEHOLDERS, TYPES, luhn_ok, redact

POSITIVES = [
    ("email", "write to jane.doe+rlhf@example.co.uk today", "jane.doe+rlhf@example.co.uk"),
    ("email", "Email: Bob_Smith99@mail-server.org.", "Bob_Smith99@mail-server.org"),
    ("phone", "call +1 (415) 555-0100 now", "+1 (415) 555-0100"),
    ("phone", "call +44 20 7946 0958 now", "+44 20 7946 0958"),
    ("phone", "call +14155550100 now", "+14155550100"),
    ("phone", "call (415) 555-0100 now", "(415) 555-0100"),
    ("phone", "call 415-555-0100 now", "415-555-0100"),
    ("phone", "call 415.555.0100 now", "415.555.0100"),
    ("phone", "call 415 555 0100 now", "415 555 0100"),
    ("phone", "Tel. 030 1234 5678 (Berlin)", "030 1234 5678"),
    ("credit_card", "card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
    ("credit_card", "card 4111-1111-1111-1111 exp", "4111-1111-1111-1111"),
    ("credit_card", "amex 378282246310005 ok", "378282246310005"),
    ("credit_card", "card 5555555555554444.", "5555555555554444"),
    ("ip_address", "server at 192.168.10.20 is down", "192.168.10.20"),
    ("ip_address", "ping 8.8.8.8.", "8.8.8.8"),
    ("ip_address", "host 2001:db8::8a2e:370:7334 up", "2001:db8::8a2e:370:7334"),
    ("ip_address", "host 2001:0db8:85a3:0000:0000:8a2e:0370:7334 up", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("ip_address", "link fe80::1ff:fe23:4567:890a here", "fe80::1ff:fe23:4567:890a"),
    ("ip_address", "mapped ::ffff:192.0.2.128 here", "::ffff:192.0.2.128"),
    ("secret", "my key sk-proj-abcdefghijklmnopqrstuvwx1234 leaked", "sk-proj-abcdefghijklmnopqrstuvwx1234"),
    ("secret", "aws AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE"),
    ("secret", "stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc here", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("secret", "gh ghp_0123456789abcdefghijABCDEFGHIJ012345 here", "ghp_0123456789abcdefghijABCDEFGHIJ012345"),
    ("secret", "slack xoxb-1234567890-abcdefghij here", "xoxb-1234567890-abcdefghij"),
    (
        "secret",
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U ok",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    ),
    ("secret", "api_key = 9f8e7d6c5b4a39281706f5e4d3c2b1a0", "9f8e7d6c5b4a39281706f5e4d3c2b1a0"),
    ("secret", 'token: "dGhpcyBpcyBhIHNlY3JldCB0b2tlbjEy"', "dGhpcyBpcyBhIHNlY3JldCB0b2tlbjEy"),
    ("secret", "my access token is 4f3a9c0b7e6d5a4f3a9c0b7e", "4f3a9c0b7e6d5a4f3a9c0b7e"),
    ("secret", "password: hunter2!", "hunter2!"),
]


@pytest.mark.parametrize("kind,text,pii", POSITIVES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(POSITIVES)])
def test_each_type_is_replaced_by_its_placeholder_and_counted(kind, text, pii):
    out, counts = redact(text)
    assert pii not in out
    assert out == text.replace(pii, PLACEHOLDERS[kind])
    assert counts == {kind: 1}


NEAR_MISSES = [
    "order 4111 1111 1111 1112 shipped",  # 16 digits, Luhn fails
    "id 1234567812345678 here",  # 16 digits, Luhn fails
    "version 1.2.3.4.5 released",  # dotted run longer than an IPv4 address
    "build 10.0.0.1234 ok",  # last part over 255
    "at 12:30:45 sharp",  # a time is not IPv6
    "use std::vector and a::b",  # code paths parse as IPv6 but are not addresses
    "mac 00:1a:2b:3c:4d:5e",  # not IPv6 (no ::, six groups)
    "the answer is 1234567890",  # a bare run of digits: not a phone number
    "on 2024-01-15 at 10:00",  # a date
    "pi is 3.14159265358979",
    "costs $1,234,567.89 in 2025",
    "the monkey typed keyboard1234567890abcdef",  # "key" inside a word
    "the token probabilities sum to one",  # "token" followed by words
    "the key is understanding",  # too short and no digits
    "email me at the usual address",
    "x+1 = 2",
]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_are_left_alone(text):
    out, counts = redact(text)
    assert out == text and not counts


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def test_several_in_one_text_and_redacting_twice_changes_nothing():
    text = (
        "I'm jane@example.com, +1 415 555 0100, card 4242 4242 4242 4242, from 10.1.2.3, "
        "key sk-ant-api03-abcdefghijklmnopqrstuvwxyz012345; order 4111 1111 1111 1112."
    )
    out, counts = redact(text)
    assert out == (
        "I'm <EMAIL>, <PHONE>, card <CREDIT_CARD>, from <IP_ADDRESS>, key <SECRET>; order 4111 1111 1111 1112."
    )
    assert counts == {"email": 1, "phone": 1, "credit_card": 1, "ip_address": 1, "secret": 1}
    again, counts = redact(out)
    assert again == out and not counts


def test_placeholders_are_typed_and_empty_text_is_fine():
    assert set(TYPES) == {"email", "phone", "credit_card", "secret", "ip_address"}
    assert all(p.startswith("<") and p.endswith(">") for p in PLACEHOLDERS.values())
    assert redact("") == ("", {})


def test_a_long_hostile_text_stays_linear():
    # digit/colon/dot soup of 200k characters: the patterns must not backtrack catastrophically
    out, _ = redact("1:2.3-4 " * 25_000 + "a@b.cd")
    assert out.endswith("<EMAIL>")
