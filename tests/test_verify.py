"""Tests for relay.verify: Standard Webhooks signing and verification."""

from __future__ import annotations

import base64
import re
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from replicate.webhook import InvalidSignatureError, Webhooks, WebhookSigningSecret
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from relay.verify import (
    SecretError,
    Verdict,
    Verification,
    decode_secret,
    sign,
    verify,
)

TOLERANCE = 300

# The published Standard Webhooks test vectors (SPEC §1).
VECTORS = [
    (
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    ),
    (
        "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
        "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
        1649367553,
        b'{"email":"test@example.com","username":"test_user"}',
        "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
    ),
]
VECTOR_IDS = ["vector-1", "vector-2"]

SECRET = VECTORS[0][0]
KEY = decode_secret(SECRET)
OTHER_SECRET = "whsec_" + base64.b64encode(b"a completely different key!!").decode()
MSG_ID = "msg_2Ux1QzxbX1ZpZ8Wcuav2EiAVOPR"
TS = 1_700_000_000
BODY = b'{"id": "ufawqhfynnddngldkgtslldrkq", "status": "succeeded"}'


def headers(
    msg_id: str = MSG_ID, ts: int | str = TS, signature: str | None = None, body: bytes = BODY, key: bytes = KEY
) -> list[tuple[str, str]]:
    if signature is None:
        signature = sign(key, msg_id, ts, body)
    return [
        ("content-type", "application/json"),
        ("webhook-id", msg_id),
        ("webhook-timestamp", str(ts)),
        ("webhook-signature", signature),
    ]


def check(
    hdrs: list[tuple[str, str]],
    body: bytes = BODY,
    key: bytes | None = KEY,
    now: float = TS,
    tolerance: int = TOLERANCE,
) -> Verification:
    result = verify(hdrs, body, key, tolerance, now)
    assert isinstance(result, Verification)
    assert isinstance(result.detail, str) and result.detail.strip()
    return result


# --- published vectors, with an injected clock


@pytest.mark.parametrize(("secret", "msg_id", "ts", "body", "signature"), VECTORS, ids=VECTOR_IDS)
def test_published_vector_sign_reproduces_signature(secret, msg_id, ts, body, signature):
    assert sign(decode_secret(secret), msg_id, ts, body) == signature
    assert sign(decode_secret(secret), msg_id, str(ts), body) == signature


@pytest.mark.parametrize(("secret", "msg_id", "ts", "body", "signature"), VECTORS, ids=VECTOR_IDS)
def test_published_vector_verifies_at_its_timestamp(secret, msg_id, ts, body, signature):
    result = check(headers(msg_id, ts, signature), body, decode_secret(secret), now=ts)
    assert result.verdict is Verdict.VERIFIED
    assert result.verdict.accepted


@pytest.mark.parametrize(("secret", "msg_id", "ts", "body", "signature"), VECTORS, ids=VECTOR_IDS)
def test_published_vector_expired_301_seconds_later(secret, msg_id, ts, body, signature):
    result = check(headers(msg_id, ts, signature), body, decode_secret(secret), now=ts + 301)
    assert result.verdict is Verdict.EXPIRED
    assert not result.verdict.accepted
    assert re.search(r"\b301 s\b", result.detail), result.detail
    assert "300" in result.detail


@pytest.mark.parametrize(("secret", "msg_id", "ts", "body", "signature"), VECTORS, ids=VECTOR_IDS)
def test_published_vector_future_301_seconds_earlier(secret, msg_id, ts, body, signature):
    result = check(headers(msg_id, ts, signature), body, decode_secret(secret), now=ts - 301)
    assert result.verdict is Verdict.FUTURE
    assert not result.verdict.accepted
    assert re.search(r"\b301 s\b", result.detail), result.detail
    assert "future" in result.detail


@pytest.mark.parametrize(("secret", "msg_id", "ts", "body", "signature"), VECTORS, ids=VECTOR_IDS)
@pytest.mark.parametrize("offset", [-300, 300])
def test_published_vector_at_tolerance_boundary_still_verified(secret, msg_id, ts, body, signature, offset):
    result = check(headers(msg_id, ts, signature), body, decode_secret(secret), now=ts + offset)
    assert result.verdict is Verdict.VERIFIED, result.detail


def test_tolerance_is_a_parameter_not_a_constant():
    hdrs = headers()
    assert check(hdrs, now=TS + 61, tolerance=60).verdict is Verdict.EXPIRED
    assert check(hdrs, now=TS + 60, tolerance=60).verdict is Verdict.VERIFIED
    assert check(hdrs, now=TS + 1000, tolerance=1000).verdict is Verdict.VERIFIED


def test_expired_detail_says_whether_signature_matched():
    good = check(headers(), now=TS + 400)
    bad = check(headers(key=decode_secret(OTHER_SECRET)), now=TS + 400)
    assert good.verdict is bad.verdict is Verdict.EXPIRED
    assert "100 s" not in good.detail
    assert "400 s" in good.detail and "400 s" in bad.detail
    assert good.detail != bad.detail


# --- cross-check with the standardwebhooks reference implementation


@pytest.mark.parametrize(("secret", "msg_id", "ts", "body", "signature"), VECTORS, ids=VECTOR_IDS)
def test_standardwebhooks_agrees_on_published_vectors(secret, msg_id, ts, body, signature):
    theirs = Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, tz=UTC), body.decode())
    assert theirs == signature == sign(decode_secret(secret), msg_id, ts, body)


def test_standardwebhooks_signs_and_we_verify():
    now = int(time.time())
    body = '{"id": "p1", "status": "processing", "logs": "héllo ✓"}'
    sig = Webhook(SECRET).sign(MSG_ID, datetime.fromtimestamp(now, tz=UTC), body)
    result = check(headers(MSG_ID, now, sig), body.encode(), KEY, now=now)
    assert result.verdict is Verdict.VERIFIED, result.detail
    # and with the wrong key we refuse what they signed
    wrong = check(headers(MSG_ID, now, sig), body.encode(), decode_secret(OTHER_SECRET), now=now)
    assert wrong.verdict is Verdict.INVALID_SIGNATURE


def test_we_sign_and_standardwebhooks_verifies():
    now = int(time.time())
    body = b'{"id": "p1", "status": "succeeded", "output": ["https://x/y.png"]}'
    hdrs = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(KEY, MSG_ID, now, body),
    }
    assert Webhook(SECRET).verify(body, hdrs) == {
        "id": "p1",
        "status": "succeeded",
        "output": ["https://x/y.png"],
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(body, hdrs)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body + b" ", hdrs)


# --- cross-check with the replicate package's validator


def test_we_sign_and_replicate_validates():
    now = int(time.time())
    body = '{"id": "rrr", "status": "succeeded"}'
    hdrs = {
        "Webhook-Id": MSG_ID,
        "Webhook-Timestamp": str(now),
        "Webhook-Signature": sign(KEY, MSG_ID, now, body.encode()),
    }
    # validate() returns None on success and raises otherwise
    assert Webhooks.validate(headers=hdrs, body=body, secret=WebhookSigningSecret(key=SECRET), tolerance=300) is None
    pairs = list(hdrs.items())
    assert check(pairs, body.encode(), KEY, now=now).verdict is Verdict.VERIFIED


def test_wrong_secret_fails_in_replicate_and_in_ours():
    now = int(time.time())
    body = '{"id": "rrr", "status": "failed"}'
    hdrs = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(KEY, MSG_ID, now, body.encode()),
    }
    with pytest.raises(InvalidSignatureError):
        Webhooks.validate(headers=hdrs, body=body, secret=WebhookSigningSecret(key=OTHER_SECRET), tolerance=300)
    result = check(list(hdrs.items()), body.encode(), decode_secret(OTHER_SECRET), now=now)
    assert result.verdict is Verdict.INVALID_SIGNATURE


# --- each verdict, with a readable detail


def test_unsigned_when_no_key_even_without_headers():
    for hdrs in (headers(), []):
        result = check(hdrs, key=None)
        assert result.verdict is Verdict.UNSIGNED
        assert result.verdict.accepted
        assert "no secret" in result.detail


REQUIRED = ("webhook-id", "webhook-timestamp", "webhook-signature")


def _without(names: set[str], empty: bool) -> list[tuple[str, str]]:
    out = []
    for name, value in headers():
        if name in names:
            if empty:
                out.append((name, "   " if name == "webhook-id" else ""))
            continue
        out.append((name, value))
    return out


@pytest.mark.parametrize("empty", [False, True], ids=["absent", "empty"])
@pytest.mark.parametrize(
    "missing",
    [
        {"webhook-id"},
        {"webhook-timestamp"},
        {"webhook-signature"},
        {"webhook-id", "webhook-signature"},
        set(REQUIRED),
    ],
    ids=lambda s: "+".join(sorted(s)),
)
def test_missing_headers_names_exactly_the_missing_ones(missing, empty):
    result = check(_without(missing, empty))
    assert result.verdict is Verdict.MISSING_HEADERS
    assert not result.verdict.accepted
    for name in REQUIRED:
        # "webhook-id" is not a substring of the other two names, so this is exact
        assert (name in result.detail) == (name in missing), (name, result.detail)


def test_missing_headers_when_no_headers_at_all():
    result = check([])
    assert result.verdict is Verdict.MISSING_HEADERS
    assert all(name in result.detail for name in REQUIRED)


@pytest.mark.parametrize("raw", ["abc", "1.5", "1614265330.0", "0x10", "1e9"])
def test_bad_timestamp(raw):
    result = check(headers(ts=raw))
    assert result.verdict is Verdict.BAD_TIMESTAMP
    assert not result.verdict.accepted
    assert repr(raw) in result.detail
    assert "integer" in result.detail


def test_invalid_signature_wrong_secret_detail():
    result = check(headers(key=decode_secret(OTHER_SECRET)))
    assert result.verdict is Verdict.INVALID_SIGNATURE
    assert not result.verdict.accepted
    assert "1 signature(s)" in result.detail
    assert "v1" in result.detail


def test_invalid_signature_detail_counts_entries_and_lists_versions():
    wrong = decode_secret(OTHER_SECRET)
    sig = " ".join([sign(wrong, MSG_ID, TS, BODY), sign(wrong, MSG_ID, TS, b"x"), "v1a,AAAA"])
    result = check(headers(signature=sig))
    assert result.verdict is Verdict.INVALID_SIGNATURE
    assert "3 signature(s)" in result.detail
    assert "versions: v1, v1a" in result.detail


def test_several_signatures_second_matches():
    wrong = sign(decode_secret(OTHER_SECRET), MSG_ID, TS, BODY)
    right = sign(KEY, MSG_ID, TS, BODY)
    assert check(headers(signature=f"{wrong} {right}")).verdict is Verdict.VERIFIED
    assert check(headers(signature=f"{wrong}  {right} ")).verdict is Verdict.VERIFIED
    assert check(headers(signature=wrong)).verdict is Verdict.INVALID_SIGNATURE


def test_unknown_version_with_right_bytes_is_ignored():
    right = sign(KEY, MSG_ID, TS, BODY)
    v2 = "v2," + right.removeprefix("v1,")
    result = check(headers(signature=v2))
    assert result.verdict is Verdict.INVALID_SIGNATURE
    assert "1 signature(s)" in result.detail
    assert "v2" in result.detail
    assert "none of version v1" in result.detail
    # but the same bytes under v1 alongside it do verify
    assert check(headers(signature=f"{v2} {right}")).verdict is Verdict.VERIFIED


def test_malformed_base64_entry_is_ignored():
    right = sign(KEY, MSG_ID, TS, BODY)
    assert check(headers(signature=f"v1,not*base64! {right}")).verdict is Verdict.VERIFIED
    result = check(headers(signature="v1,not*base64!"))
    assert result.verdict is Verdict.INVALID_SIGNATURE
    assert "1 signature(s)" in result.detail
    # the right bytes with junk characters mixed in are malformed too: ignored, not salvaged
    encoded = right.removeprefix("v1,")
    junk = f"v1,{encoded[:10]}!*{encoded[10:]}"
    assert check(headers(signature=junk)).verdict is Verdict.INVALID_SIGNATURE


def test_signature_entry_without_comma_is_not_counted():
    result = check(headers(signature="garbage"))
    assert result.verdict is Verdict.INVALID_SIGNATURE
    assert "no signature entries" in result.detail


def test_headers_matched_case_insensitively():
    hdrs = [(name.upper() if name.startswith("webhook") else name, v) for name, v in headers()]
    assert check(hdrs).verdict is Verdict.VERIFIED
    mixed = [(name.title(), v) for name, v in headers()]
    assert check(mixed).verdict is Verdict.VERIFIED


def test_empty_body_signed_verifies_and_differs_from_nonempty():
    sig = sign(KEY, MSG_ID, TS, b"")
    assert check(headers(signature=sig), body=b"").verdict is Verdict.VERIFIED
    assert check(headers(signature=sig), body=b" ").verdict is Verdict.INVALID_SIGNATURE


def test_verification_is_deterministic_and_does_not_read_the_clock():
    # a delivery from 2021 verified against its receipt time, long after the fact
    secret, msg_id, ts, body, signature = VECTORS[0]
    results = {check(headers(msg_id, ts, signature), body, decode_secret(secret), now=ts + 5) for _ in range(3)}
    assert len(results) == 1
    assert results.pop().verdict is Verdict.VERIFIED


# --- decode_secret


def test_decode_secret_with_and_without_prefix():
    raw = base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw") == raw
    assert decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw") == raw
    assert decode_secret("  whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n") == raw
    assert len(raw) == 24


@pytest.mark.parametrize(
    "garbage",
    ["whsec_not base64!", "whsec_", "", "   ", "whsec_@@@@", "whsec_abc", "whsec_===="],
)
def test_decode_secret_garbage_raises(garbage):
    with pytest.raises(SecretError):
        decode_secret(garbage)
    assert issubclass(SecretError, ValueError)


def test_secret_text_is_not_the_key():
    # Replicate's docs once used the secret text directly: that must not verify.
    secret, msg_id, ts, body, signature = VECTORS[0]
    result = check(headers(msg_id, ts, signature), body, secret.encode(), now=ts)
    assert result.verdict is Verdict.INVALID_SIGNATURE


# --- properties

msg_ids = st.text(min_size=1, max_size=60).filter(lambda s: s.strip() == s and s != "")
timestamps = st.integers(min_value=0, max_value=10**11)
bodies = st.binary(max_size=512)
skews = st.integers(min_value=-TOLERANCE, max_value=TOLERANCE)
keys = st.binary(min_size=1, max_size=64)
PROPERTY = settings(max_examples=200, database=None, deadline=None)  # every property test


@PROPERTY
@given(key=keys, msg_id=msg_ids, ts=timestamps, body=bodies, skew=skews)
def test_property_sign_then_verify(key, msg_id, ts, body, skew):
    result = verify(headers(msg_id, ts, body=body, key=key), body, key, TOLERANCE, ts + skew)
    assert result.verdict is Verdict.VERIFIED, result.detail


@PROPERTY
@given(
    key=keys,
    msg_id=msg_ids,
    ts=timestamps,
    body=bodies.filter(bool),
    data=st.data(),
)
def test_property_flipping_a_body_byte_breaks_it(key, msg_id, ts, body, data):
    index = data.draw(st.integers(min_value=0, max_value=len(body) - 1), label="index")
    mask = data.draw(st.integers(min_value=1, max_value=255), label="mask")
    tampered = bytearray(body)
    tampered[index] ^= mask
    hdrs = headers(msg_id, ts, body=body, key=key)
    result = verify(hdrs, bytes(tampered), key, TOLERANCE, ts)
    assert result.verdict is Verdict.INVALID_SIGNATURE, result.detail


@PROPERTY
@given(key=keys, msg_id=msg_ids, other_id=msg_ids, ts=timestamps, body=bodies)
def test_property_changing_the_id_breaks_it(key, msg_id, other_id, ts, body):
    if other_id == msg_id:
        other_id = msg_id + "x"
    sig = sign(key, msg_id, ts, body)
    result = verify(headers(other_id, ts, sig), body, key, TOLERANCE, ts)
    assert result.verdict is Verdict.INVALID_SIGNATURE, result.detail


@PROPERTY
@given(
    key=keys,
    msg_id=msg_ids,
    ts=timestamps,
    delta=st.integers(min_value=-(10**6), max_value=10**6).filter(bool),
    body=bodies,
)
def test_property_changing_the_timestamp_breaks_it(key, msg_id, ts, delta, body):
    sig = sign(key, msg_id, ts, body)
    # the clock follows the claimed timestamp, so only the signature can refuse it
    result = verify(headers(msg_id, ts + delta, sig), body, key, TOLERANCE, ts + delta)
    # (a negative timestamp is refused earlier, as bad_timestamp)
    assert result.verdict in (Verdict.INVALID_SIGNATURE, Verdict.BAD_TIMESTAMP), result.detail
    # and against the original clock it is never verified either
    later = verify(headers(msg_id, ts + delta, sig), body, key, TOLERANCE, ts)
    assert later.verdict is not Verdict.VERIFIED


@pytest.mark.parametrize("raw", ["1_700_000_000", "+1700000000", "١٧٠٠٠٠٠٠٠٠", "-5"])
def test_timestamps_that_python_would_parse_but_are_not_plain_digits_are_bad(raw):
    key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    hdrs = [("webhook-id", "m"), ("webhook-timestamp", raw), ("webhook-signature", sign(key, "m", raw, b"x"))]
    assert verify(hdrs, b"x", key, 300, 1_700_000_000).verdict is Verdict.BAD_TIMESTAMP
