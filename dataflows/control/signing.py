"""Signed model descriptors: who vouches for a model, checked before it is loaded.

A descriptor's sha256 only proves its bytes are intact: anyone who can write to the
control topic can compute it. A signature proves who published it. The signer holds an
Ed25519 private key; the dataflow holds the public keys it trusts (a directory, e.g. a
mounted Kubernetes Secret, re-read when it changes so keys rotate without a restart) and a
policy:

- ``require``: an unsigned descriptor, an unknown key or a bad signature is rejected with
  that reason, and the model serving keeps serving;
- ``warn``: the same findings are logged and reported in the model event, the model installs;
- ``off``: signatures are not checked (a signed model's key id is still reported).

What is signed is the descriptor's canonical content: its deterministic protobuf encoding
with the model bytes and the signature cleared, after a domain tag. The model bytes are
covered by the sha256 field, which the registry checks against them, so a signature over a
by-reference descriptor is as good as one over a by-value one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protos import waxserve_pb2 as pb

log = logging.getLogger(__name__)

ALGORITHM = "ed25519"
DOMAIN = b"waxserve.model-descriptor.v1\n"
"""Prefix of the signed bytes, so a signature made for anything else never verifies here."""

PUBLIC_SUFFIXES = (".pub", ".pem")
MAX_KEY_FILE_BYTES = 16 << 10
MAX_TRUSTED_KEYS = 256


class SignaturePolicy(StrEnum):
    """What the registry does with a descriptor whose signature does not check out."""

    REQUIRE = "require"
    WARN = "warn"
    OFF = "off"


class SignatureStatus(StrEnum):
    """The finding on one descriptor."""

    VALID = "valid"  # signed by a trusted key, and the signature verifies
    UNSIGNED = "unsigned"
    UNKNOWN_KEY = "unknown_key"  # signed, by a key the dataflow does not trust
    BAD_SIGNATURE = "bad_signature"  # a trusted key id, but the signature does not verify
    NOT_CHECKED = "not_checked"  # policy off


class SigningError(ValueError):
    """A key or key file that cannot be used, with what is wrong with it."""


@dataclass(frozen=True)
class Verdict:
    """A descriptor's signature finding: `accepted` says whether the policy lets it in."""

    status: SignatureStatus
    key_id: str
    accepted: bool
    message: str


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """A key's id: the first 16 hex digits of the SHA-256 of its 32 raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical_content(descriptor: pb.ModelDescriptor) -> bytes:
    """The bytes a descriptor's signature covers."""
    content = pb.ModelDescriptor()
    content.CopyFrom(descriptor)
    content.ClearField("signature")
    if content.WhichOneof("source") == "model_bytes":
        content.ClearField("model_bytes")  # covered by sha256, which the registry checks
    return DOMAIN + content.SerializeToString(deterministic=True)


def sign(descriptor: pb.ModelDescriptor, private_key: Ed25519PrivateKey) -> str:
    """Sign a descriptor in place; returns the key id. Fill in every other field first:
    changing any of them afterwards breaks the signature."""
    key_id = key_id_of(private_key.public_key())
    signature = private_key.sign(canonical_content(descriptor))
    descriptor.signature.CopyFrom(
        pb.DescriptorSignature(key_id=key_id, signature=signature, algorithm=ALGORITHM)
    )
    return key_id


# --- key files --------------------------------------------------------------------------


def generate_key_pair(directory: Path, name: str) -> tuple[Path, Path, str]:
    """Write a new key pair as `<name>.key` (PKCS#8 PEM, owner-only) and `<name>.pub`
    (SubjectPublicKeyInfo PEM) in `directory`; returns both paths and the key id. Refuses
    to overwrite an existing key."""
    if not name or "/" in name or name.startswith("."):
        raise SigningError(f"key name {name!r}: use a plain file name, e.g. 'ci-2026'")
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise SigningError(f"{path} exists: choose another name (keys are never overwritten)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path, key_id_of(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (`waxserve keys generate` writes them)."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path}: a {type(key).__name__}, not an Ed25519 key")
    return key


def _read_key_file(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_KEY_FILE_BYTES:
            raise SigningError(f"{path}: {size} bytes is no key file")
        return path.read_bytes()
    except OSError as exc:
        raise SigningError(f"{path}: {exc.strerror or exc}") from None


# --- the trusted keys -------------------------------------------------------------------


class TrustedKeys:
    """The public keys a dataflow trusts, by key id, read from a directory.

    Every `*.pub` or `*.pem` file of the directory is one key (a Kubernetes Secret mounted
    as a volume gives one file per data key). The directory is read again when its listing
    or any file's modification time changes (Kubernetes swaps the whole directory on a
    Secret update), so adding the new key before signing with it, and removing the old one
    after, rotates keys without downtime. A file that is not an Ed25519 public key is
    skipped with an error in the log, never trusted.
    """

    def __init__(self, directory: Path | None, keys: dict[str, Ed25519PublicKey] | None = None):
        self.directory = directory
        self._keys: dict[str, Ed25519PublicKey] = dict(keys or {})
        self._seen: tuple[tuple[str, int, int], ...] | None = None
        self.problems: list[str] = []
        self._lock = threading.Lock()  # loader threads and workers verify concurrently
        self.refresh()

    @classmethod
    def of(cls, *public_keys: Ed25519PublicKey) -> TrustedKeys:
        """A fixed set of keys (tests, tools)."""
        return cls(None, {key_id_of(k): k for k in public_keys})

    def _listing(self) -> tuple[tuple[str, int, int], ...]:
        assert self.directory is not None
        entries = []
        try:
            for path in sorted(self.directory.iterdir()):
                if path.name.startswith(".") or path.suffix not in PUBLIC_SUFFIXES:
                    continue
                info = path.stat()  # follows the symlinks a mounted Secret is made of
                if stat.S_ISREG(info.st_mode):
                    entries.append((path.name, info.st_mtime_ns, info.st_size))
        except OSError as exc:
            self.problems = [f"trusted keys directory {self.directory}: {exc.strerror or exc}"]
            return ()
        return tuple(entries)

    def refresh(self) -> bool:
        """Re-read the directory if it changed; returns whether the key set was re-read."""
        if self.directory is None:
            return False
        with self._lock:
            return self._reread()

    def _reread(self) -> bool:
        assert self.directory is not None
        listing = self._listing()
        if listing == self._seen:
            return False
        keys: dict[str, Ed25519PublicKey] = {}
        problems: list[str] = list(self.problems) if not listing else []
        for name, _, _ in listing[:MAX_TRUSTED_KEYS]:
            try:
                key = load_public_key(self.directory / name)
            except SigningError as exc:
                problems.append(str(exc))
                continue
            keys[key_id_of(key)] = key
        if len(listing) > MAX_TRUSTED_KEYS:
            problems.append(f"{self.directory}: only the first {MAX_TRUSTED_KEYS} keys are read")
        for problem in problems:
            log.error("trusted keys: %s", problem)
        self._keys, self._seen, self.problems = keys, listing, problems
        log.info("trusted keys: %s", ", ".join(sorted(keys)) or "none")
        return True

    @property
    def key_ids(self) -> list[str]:
        """The ids of the keys trusted now."""
        return sorted(self._keys)

    def get(self, key_id: str) -> Ed25519PublicKey | None:
        """The trusted key with this id, if any."""
        return self._keys.get(key_id)


def verify(descriptor: pb.ModelDescriptor, keys: TrustedKeys, policy: SignaturePolicy) -> Verdict:
    """The signature finding on a descriptor under a policy."""
    signed = descriptor.HasField("signature")
    key_id = descriptor.signature.key_id if signed else ""
    if policy is SignaturePolicy.OFF:
        return Verdict(SignatureStatus.NOT_CHECKED, key_id, True, "signatures are not checked")
    keys.refresh()
    status, message = _check(descriptor, keys)
    accepted = status is SignatureStatus.VALID or policy is SignaturePolicy.WARN
    return Verdict(status, key_id, accepted, message)


def _check(descriptor: pb.ModelDescriptor, keys: TrustedKeys) -> tuple[SignatureStatus, str]:
    if not descriptor.HasField("signature"):
        return SignatureStatus.UNSIGNED, "the descriptor is not signed"
    signature = descriptor.signature
    if signature.algorithm not in ("", ALGORITHM):
        return (
            SignatureStatus.BAD_SIGNATURE,
            f"signature algorithm {signature.algorithm[:40]!r} is not {ALGORITHM}",
        )
    key = keys.get(signature.key_id)
    if key is None:
        trusted = ", ".join(keys.key_ids) or "none"
        return (
            SignatureStatus.UNKNOWN_KEY,
            f"signed by key {signature.key_id[:40]!r}, which is not trusted (trusted: {trusted})",
        )
    try:
        key.verify(signature.signature, canonical_content(descriptor))
    except InvalidSignature:
        return (
            SignatureStatus.BAD_SIGNATURE,
            f"the signature by key {signature.key_id} does not match the descriptor's content "
            "(changed after signing, or signed by another key)",
        )
    return SignatureStatus.VALID, f"signed by trusted key {signature.key_id}"
