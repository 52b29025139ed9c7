"""The symmetric ciphertext blob: what Encrypt and GenerateDataKey return and Decrypt accepts.

Layout of format 1 (all integers big-endian)::

    offset  size  field
    0       1     format version, 0x01
    1       16    key id (the key's UUID, raw bytes)
    17      4     key version (uint32): which version of the key's material sealed this blob
    21      16    salt: random per message; HKDF(material, salt) gives this message's key and nonce
    37      n     AES-256-GCM ciphertext of the plaintext
    37+n    16    GCM tag

The GCM additional data is the 37-byte header followed by the canonical encoding of the
encryption context, so a change to any header byte or to the context fails the tag check.
The blob names its key and version, so Decrypt needs no KeyId and rotation costs callers nothing.

Format 2 is for keys whose material never leaves an HSM (no per-message key can be derived from
it outside the token), sealed by the HSM itself with AES-256-GCM and a random 96-bit IV::

    offset  size  field
    0       1     format version, 0x02
    1       16    key id
    17      4     key version (uint32)
    21      12    IV: random per message
    33      n     AES-256-GCM ciphertext of the plaintext
    33+n    16    GCM tag

with the same additional data (the 33-byte header, then the encoded context). Random 96-bit IVs
limit one key to 2**32 messages (NIST SP 800-38D): beyond that, the chance of an IV repeating is
no longer negligible.

Format 3 is for keys in an external key store: double encryption. The plaintext is first sealed
as a format-1 blob under the key's own material (kept by openkms); that inner blob is then
encrypted by the customer's external key manager through its XKS proxy, so that neither side alone
can decrypt::

    offset     size  field
    0          1     format version, 0x03
    1          16    key id
    17         4     key version (uint32)
    21         1     n: the length of the proxy's IV (12 or 16)
    22         1     m: the length of the proxy's ciphertext metadata (0 to 20)
    23         n     the proxy's IV
    23+n       m     the proxy's ciphertext metadata
    23+n+m     16    the proxy's authentication tag
    39+n+m     rest  the proxy's ciphertext of the inner format-1 blob

The additional authenticated data given to the proxy is the first 21 bytes followed by SHA-256 of
the encoded encryption context, so the external key binds the key, the version and the context
too; the proxy binds its metadata itself (XKS spec).
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from ..errors import InvalidCiphertextException
from .aead import TAG_BYTES, decrypt_with, derive_message_key, encrypt_with

FORMAT_V1 = 1
FORMAT_V2 = 2
FORMAT_V3 = 3
SALT_BYTES = 16
IV_BYTES = 12
HEADER = struct.Struct(">B16sI16s")
HEADER_V2 = struct.Struct(">B16sI12s")
HEADER_BYTES = HEADER.size  # 37
HEADER_V2_BYTES = HEADER_V2.size  # 33
HEADER_V3 = struct.Struct(">B16sI")
HEADER_V3_BYTES = HEADER_V3.size  # 21
XKS_IV_BYTES = (12, 16)
XKS_MAX_METADATA = 20
MIN_BLOB_BYTES = HEADER_BYTES + TAG_BYTES
_HKDF_INFO = b"openkms blob v1"


@dataclass(frozen=True, slots=True)
class BlobHeader:
    key_id: str
    version: int
    salt: bytes  # format 1: the HKDF salt; format 2: the GCM IV
    raw: bytes
    format: int = FORMAT_V1


def encode_context(context: Mapping[str, str] | None) -> bytes:
    """Canonical, unambiguous bytes of an encryption context: count, then sorted length-prefixed
    UTF-8 key/value pairs. The order a caller lists the pairs in does not matter, as in AWS."""
    if not context:
        return b"\x00\x00\x00\x00"
    items = sorted((k.encode("utf-8", "surrogatepass"), v.encode("utf-8", "surrogatepass"))
                   for k, v in context.items())
    parts = [struct.pack(">I", len(items))]
    for k, v in items:
        parts.append(struct.pack(">I", len(k)))
        parts.append(k)
        parts.append(struct.pack(">I", len(v)))
        parts.append(v)
    return b"".join(parts)


def parse_header(blob: bytes) -> BlobHeader:
    """Read the header. Anything that is not a well-formed format-1 or 2 blob is InvalidCiphertext."""
    if len(blob) >= MIN_BLOB_BYTES and blob[0] == FORMAT_V1:
        _, key_bytes, version, salt = HEADER.unpack_from(blob)
        return BlobHeader(key_id=str(uuid.UUID(bytes=key_bytes)), version=version, salt=salt,
                          raw=blob[:HEADER_BYTES])
    if len(blob) >= HEADER_V2_BYTES + TAG_BYTES and blob[0] == FORMAT_V2:
        _, key_bytes, version, iv = HEADER_V2.unpack_from(blob)
        return BlobHeader(key_id=str(uuid.UUID(bytes=key_bytes)), version=version, salt=iv,
                          raw=blob[:HEADER_V2_BYTES], format=FORMAT_V2)
    if len(blob) >= HEADER_V3_BYTES + 2 and blob[0] == FORMAT_V3:
        _, key_bytes, version = HEADER_V3.unpack_from(blob)
        unpack_v3(blob)  # the layout must hold together
        return BlobHeader(key_id=str(uuid.UUID(bytes=key_bytes)), version=version, salt=b"",
                          raw=blob[:HEADER_V3_BYTES], format=FORMAT_V3)
    raise InvalidCiphertextException()


@dataclass(frozen=True, slots=True)
class XksParts:
    """What the XKS proxy returned for the inner blob (format 3)."""

    iv: bytes
    metadata: bytes
    tag: bytes
    ciphertext: bytes


def header_v3(key_id: str, version: int) -> bytes:
    return HEADER_V3.pack(FORMAT_V3, _key_id_bytes(key_id), version)


def xks_aad(header: bytes, context: Mapping[str, str] | None) -> bytes:
    """The AAD sent to the XKS proxy: the 21-byte header, then SHA-256 of the encoded context."""
    return header + hashlib.sha256(encode_context(context)).digest()


def pack_v3(header: bytes, parts: XksParts) -> bytes:
    if len(parts.iv) not in XKS_IV_BYTES or len(parts.metadata) > XKS_MAX_METADATA or len(parts.tag) != TAG_BYTES:
        raise ValueError("not a valid XKS encryption result")
    return b"".join((header, bytes((len(parts.iv), len(parts.metadata))), parts.iv, parts.metadata, parts.tag,
                     parts.ciphertext))


def unpack_v3(blob: bytes) -> XksParts:
    """The proxy's parts of a format-3 blob; InvalidCiphertextException if they do not fit."""
    if len(blob) < HEADER_V3_BYTES + 2 or blob[0] != FORMAT_V3:
        raise InvalidCiphertextException()
    n, m = blob[HEADER_V3_BYTES], blob[HEADER_V3_BYTES + 1]
    start = HEADER_V3_BYTES + 2
    if n not in XKS_IV_BYTES or m > XKS_MAX_METADATA or len(blob) < start + n + m + TAG_BYTES + 1:
        raise InvalidCiphertextException()
    tag_at = start + n + m
    return XksParts(blob[start:start + n], blob[start + n:tag_at], blob[tag_at:tag_at + TAG_BYTES],
                    blob[tag_at + TAG_BYTES:])


def header_v2(key_id: str, version: int, iv: bytes) -> bytes:
    """The header of a format-2 blob (sealed in an HSM: see the module docstring)."""
    return HEADER_V2.pack(FORMAT_V2, _key_id_bytes(key_id), version, iv)


def aad(header: bytes, context: Mapping[str, str] | None) -> bytes:
    """The GCM additional data of a blob: its header, then the encoded encryption context."""
    return header + encode_context(context)


@lru_cache(maxsize=65536)
def _key_id_bytes(key_id: str) -> bytes:
    return uuid.UUID(key_id).bytes


def seal(material: bytes, key_id: str, version: int, plaintext: bytes,
         context: Mapping[str, str] | None) -> bytes:
    salt = os.urandom(SALT_BYTES)
    header = HEADER.pack(FORMAT_V1, _key_id_bytes(key_id), version, salt)
    msg_key, nonce = derive_message_key(material, salt, _HKDF_INFO)
    return header + encrypt_with(msg_key, nonce, plaintext, header + encode_context(context))


def open_blob(material: bytes, header: BlobHeader, blob: bytes,
              context: Mapping[str, str] | None) -> bytes:
    if header.format != FORMAT_V1:
        raise InvalidCiphertextException()
    msg_key, nonce = derive_message_key(material, header.salt, _HKDF_INFO)
    return decrypt_with(msg_key, nonce, blob[HEADER_BYTES:], header.raw + encode_context(context))
