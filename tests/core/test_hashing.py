"""Content keys (core/hashing.py): one function, each caller's algorithm and length kept, because the keys name
things on disk (trial ids, cache directories). The digests below were made by the inline code each caller had."""
import pytest

from core.hashing import canonical_json, content_hash, json_hash

VALUE = {"b": [1, 0.5], "a": "x"}


def test_digests_of_bytes_and_text():
    # FIPS 180-2's test vectors for "abc"
    assert content_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert content_hash("abc", algorithm="sha1", hex_chars=12) == "a9993e364706"


def test_the_json_forms_of_the_keys_on_disk():
    assert canonical_json(VALUE) == '{"a":"x","b":[1,0.5]}'
    assert canonical_json(VALUE, compact=False) == '{"a": "x", "b": [1, 0.5]}'
    assert json_hash(VALUE, hex_chars=24) == "b0ffca5db2f8b2b87ae0937a"  # the token cache's key
    assert json_hash(VALUE, algorithm="sha1", hex_chars=12, compact=False) == "9b425ae578e1"  # the suite's
    assert json_hash([3, "3.11", 0.1], algorithm="sha1", hex_chars=12, compact=False) == "1d4ef2417d02"  # its pairs


def test_nan_has_no_key():
    with pytest.raises(ValueError):
        json_hash({"lr": float("nan")})
