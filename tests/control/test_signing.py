"""Signed descriptors: every finding under every policy, key files, and key rotation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dataflows.control.signing import (
    SignaturePolicy,
    SignatureStatus,
    SigningError,
    TrustedKeys,
    canonical_content,
    generate_key_pair,
    key_id_of,
    load_private_key,
    sign,
    verify,
)
from dataflows.core.descriptors import load_catalog
from protos import waxserve_pb2 as pb

POLICIES = list(SignaturePolicy)


def descriptor() -> pb.ModelDescriptor:
    return load_catalog()["wine-lr"].descriptor()


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def expected_acceptance(status: SignatureStatus, policy: SignaturePolicy) -> bool:
    return policy is not SignaturePolicy.REQUIRE or status is SignatureStatus.VALID


@pytest.mark.parametrize("policy", POLICIES)
def test_a_descriptor_signed_by_a_trusted_key_is_accepted(
    key: Ed25519PrivateKey, policy: SignaturePolicy
) -> None:
    desc = descriptor()
    key_id = sign(desc, key)
    verdict = verify(desc, TrustedKeys.of(key.public_key()), policy)
    assert verdict.accepted
    assert verdict.key_id == key_id == key_id_of(key.public_key())
    want = SignatureStatus.NOT_CHECKED if policy is SignaturePolicy.OFF else SignatureStatus.VALID
    assert verdict.status is want


def tampered_descriptors(key: Ed25519PrivateKey) -> dict[str, pb.ModelDescriptor]:
    cases = {}
    for name, change in {
        "version": lambda d: setattr(d, "version", "9"),
        "sha256": lambda d: setattr(d, "sha256", "0" * 64),
        "data_type": lambda d: setattr(d, "data_type", "other"),
        "inputs": lambda d: d.input_features.reverse(),
        "profile": lambda d: d.reference_profile.features[0].bin_edges.__setitem__(0, 0.0),
        "signature": lambda d: setattr(d.signature, "signature", bytes(64 - 1) + b"\x01"),
    }.items():
        desc = descriptor()
        sign(desc, key)
        change(desc)
        cases[name] = desc
    return cases


@pytest.mark.parametrize("policy", POLICIES)
def test_a_change_after_signing_breaks_the_signature(
    key: Ed25519PrivateKey, policy: SignaturePolicy
) -> None:
    keys = TrustedKeys.of(key.public_key())
    for what, desc in tampered_descriptors(key).items():
        verdict = verify(desc, keys, policy)
        if policy is SignaturePolicy.OFF:
            assert verdict.accepted and verdict.status is SignatureStatus.NOT_CHECKED
            continue
        assert verdict.status is SignatureStatus.BAD_SIGNATURE, what
        assert verdict.accepted is expected_acceptance(verdict.status, policy), what
        assert "does not match" in verdict.message


def test_model_bytes_are_covered_by_their_digest(key: Ed25519PrivateKey) -> None:
    # Swapping the bytes for a reference (or back) keeps the content the same, since the
    # registry checks the bytes against the signed sha256 either way.
    desc = descriptor()
    sign(desc, key)
    by_reference = pb.ModelDescriptor()
    by_reference.CopyFrom(desc)
    by_reference.ClearField("model_bytes")
    assert canonical_content(by_reference) == canonical_content(desc)
    by_reference.location = "file:///models/wine-lr.onnx"
    assert verify(
        by_reference, TrustedKeys.of(key.public_key()), SignaturePolicy.REQUIRE
    ).status is (SignatureStatus.BAD_SIGNATURE)


@pytest.mark.parametrize("policy", POLICIES)
def test_unknown_key_and_unsigned(key: Ed25519PrivateKey, policy: SignaturePolicy) -> None:
    stranger = Ed25519PrivateKey.generate()
    signed_by_stranger = descriptor()
    sign(signed_by_stranger, stranger)
    keys = TrustedKeys.of(key.public_key())
    for desc, status in (
        (signed_by_stranger, SignatureStatus.UNKNOWN_KEY),
        (descriptor(), SignatureStatus.UNSIGNED),
    ):
        verdict = verify(desc, keys, policy)
        if policy is SignaturePolicy.OFF:
            assert verdict.accepted
            continue
        assert verdict.status is status
        assert verdict.accepted is expected_acceptance(status, policy)
    assert (
        key_id_of(key.public_key())
        in verify(signed_by_stranger, keys, SignaturePolicy.REQUIRE).message
    )


def test_key_files_and_rotation_without_restart(tmp_path: Path) -> None:
    signer_dir, trusted_dir = tmp_path / "signer", tmp_path / "trusted"
    trusted_dir.mkdir()
    old_private, old_public, old_id = generate_key_pair(signer_dir, "old")
    assert os.stat(old_private).st_mode & 0o777 == 0o600
    new_private, new_public, new_id = generate_key_pair(signer_dir, "new")
    with pytest.raises(SigningError, match="exists"):
        generate_key_pair(signer_dir, "old")

    (trusted_dir / "old.pub").write_bytes(old_public.read_bytes())
    (trusted_dir / "README.txt").write_text("not a key: ignored by suffix")
    keys = TrustedKeys(trusted_dir)
    assert keys.key_ids == [old_id]

    by_old, by_new = descriptor(), descriptor()
    sign(by_old, load_private_key(old_private))
    sign(by_new, load_private_key(new_private))
    require = SignaturePolicy.REQUIRE
    assert verify(by_old, keys, require).accepted
    assert verify(by_new, keys, require).status is SignatureStatus.UNKNOWN_KEY

    # Rotation: the new key is added, both verify; then the old one goes.
    (trusted_dir / "new.pub").write_bytes(new_public.read_bytes())
    assert verify(by_new, keys, require).accepted
    assert verify(by_old, keys, require).accepted
    (trusted_dir / "old.pub").unlink()
    assert verify(by_old, keys, require).status is SignatureStatus.UNKNOWN_KEY
    assert verify(by_new, keys, require).accepted
    assert keys.key_ids == [new_id]


def test_a_bad_key_file_is_reported_and_never_trusted(tmp_path: Path) -> None:
    (tmp_path / "garbage.pub").write_text("-----BEGIN PUBLIC KEY-----\nnope\n")
    _, public, key_id = generate_key_pair(tmp_path / "k", "good")
    (tmp_path / "good.pem").write_bytes(public.read_bytes())
    keys = TrustedKeys(tmp_path)
    assert keys.key_ids == [key_id]
    assert any("garbage.pub" in p for p in keys.problems)
    with pytest.raises(SigningError, match="not an unencrypted PEM private key"):
        load_private_key(tmp_path / "good.pem")
    with pytest.raises(SigningError, match="plain file name"):
        generate_key_pair(tmp_path, "../escape")


def test_a_missing_directory_trusts_nothing(tmp_path: Path) -> None:
    keys = TrustedKeys(tmp_path / "absent")
    assert keys.key_ids == []
    assert keys.problems
    desc = descriptor()
    sign(desc, Ed25519PrivateKey.generate())
    assert not verify(desc, keys, SignaturePolicy.REQUIRE).accepted
