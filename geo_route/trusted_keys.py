"""The keys a registry trusts to sign its tokens, under every name a registry dialect gives them.

``token.rootcertbundle`` (PEM certificates) and the optional ``token.jwks`` (Distribution 3's JWKS
file) are read once into key objects. A token names its signing key in one of three ways, tried in
the registries' order (x5c, then jwk, then kid; the first present decides, with no fallback):

* ``kid``: a bundle key's libtrust fingerprint (Distribution 2.8, GitLab), its RFC 7638 thumbprint
  (Distribution 3; also as 3.1 computes it for EC keys, without leading zero bytes), or a JWKS
  entry's ``kid`` exactly as written; optionally the Distribution 3.0.0 quirk (below);
* ``x5c``: a certificate chain that verifies to the bundle at the current time
  (``cryptography.x509.verification`` with Go's leniency: any extended key usage; a leaf issued
  directly by a bundle certificate is also checked by its signature alone, as Go does for roots
  without basicConstraints); the leaf's key signs the token;
* ``jwk``: a key whose libtrust fingerprint is a bundle key's and whose ``kid``, if any, is that
  fingerprint (2.8), or whose own ``kid`` names a trusted key (3.x, which then verifies with that
  trusted key); a ``jwk`` carrying ``x5c`` must match that chain's leaf.

Every key that can come out of here is a bundle or JWKS key, or the leaf of a chain to the bundle.
The 3.0.0 quirk (``token.accept_v3_0_ec_quirk``): that release names every EC key of a curve by the
thumbprint of the curve's generator point, so the id maps to the bundle's last key of that curve.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from geo_route.errors import KeyBundleError, TokenError

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PUBLIC_KEY_TYPES = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)
# Go's x509.Verify with ExtKeyUsageAny: no extension requirements beyond what chain building needs.
EE_POLICY = ExtensionPolicy.permit_all()
CA_POLICY = ExtensionPolicy.permit_all().require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)


def libtrust_kid(key: PublicKey) -> str:
    """The libtrust key ID: SHA-256 of the DER SubjectPublicKeyInfo, 30 bytes, base32, 4-char groups."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii")
    return ":".join(encoded[i : i + 4] for i in range(0, 48, 4))


def jwk_thumbprint(key: PublicKey) -> str:
    """RFC 7638 SHA-256 thumbprint (base64url, unpadded) of the key's public JWK."""
    if isinstance(key, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
        return _thumbprint({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]})
    if isinstance(key, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
        return _thumbprint({"crv": jwk["crv"], "kty": "EC", "x": jwk["x"], "y": jwk["y"]})
    jwk = OKPAlgorithm.to_jwk(key, as_dict=True)
    return _thumbprint({"crv": "Ed25519", "kty": "OKP", "x": jwk["x"]})


def distribution_ec_thumbprint(curve: str, x: int, y: int) -> str:
    """Distribution 3's EC thumbprint: coordinates as Go's ``big.Int.Bytes()`` (no leading zeros)."""
    return _thumbprint({"crv": curve, "kty": "EC", "x": _minimal_b64(x), "y": _minimal_b64(y)})


def _minimal_b64(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


def _thumbprint(members: Mapping[str, str]) -> str:
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


def thumbprints(key: PublicKey) -> set[str]:
    """The thumbprint ``kid``s Distribution 3 gives a ``rootcertbundle`` key (RFC 7638, and 3.1's)."""
    ids = {jwk_thumbprint(key)}
    if isinstance(key, ec.EllipticCurvePublicKey):
        numbers = key.public_numbers()
        ids.add(distribution_ec_thumbprint(ECAlgorithm.to_jwk(key, as_dict=True)["crv"], numbers.x, numbers.y))
    return ids


def generator_kid(curve: ec.EllipticCurve) -> str:
    """The id Distribution 3.0.0 gives every EC key of ``curve`` (the thumbprint of its generator)."""
    generator = ec.derive_private_key(1, curve).public_key()
    crv = ECAlgorithm.to_jwk(generator, as_dict=True)["crv"]
    numbers = generator.public_numbers()
    return distribution_ec_thumbprint(crv, numbers.x, numbers.y)


def load_certificates(bundle: str | Path) -> list[x509.Certificate]:
    """The certificates of a PEM bundle (like ``rootcertbundle``); at least one with a usable key."""
    try:
        pem = Path(bundle).read_bytes()
    except OSError as exc:
        raise KeyBundleError(f"cannot read certificate bundle {bundle}: {exc.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise KeyBundleError(f"certificate bundle {bundle} is not PEM certificates: {exc}") from None
    if not any(isinstance(c.public_key(), PUBLIC_KEY_TYPES) for c in certificates):
        raise KeyBundleError(f"certificate bundle {bundle} holds no RSA, EC or Ed25519 public key")
    return certificates


def load_jwks(path: str | Path) -> dict[str, PublicKey]:
    """The public keys of a JWKS file by ``kid`` as written; symmetric and kid-less keys are skipped
    (Distribution 3 cannot verify with them either)."""
    try:
        document = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise KeyBundleError(f"cannot read JWKS file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise KeyBundleError(f"JWKS file {path} is not JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise KeyBundleError(f'JWKS file {path} has no "keys" list')
    keys: dict[str, PublicKey] = {}
    for entry in entries:
        key = public_key_of_jwk(entry)
        if key is not None and isinstance(entry.get("kid"), str) and entry["kid"]:
            keys[entry["kid"]] = key
    return keys


def public_key_of_jwk(entry: object) -> PublicKey | None:
    """The public key of an RSA, EC or Ed25519 JWK (a private JWK gives its public half), else None."""
    if not isinstance(entry, dict):
        return None
    try:
        key = jwt.PyJWK(entry).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        key = key.public_key()
    return key if isinstance(key, PUBLIC_KEY_TYPES) else None


def same_key(a: PublicKey, b: PublicKey) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(serialization.Encoding.DER, spki) == b.public_bytes(serialization.Encoding.DER, spki)


@dataclass(frozen=True)
class Candidate:
    """A trusted key a token names; ``libtrust``: named the libtrust way, so only the algorithms
    libtrust verifies (RS*, ES*) apply, as in the registries that name keys so."""

    key: PublicKey
    libtrust: bool = False


@dataclass(frozen=True)
class TrustedKeys:
    """Bundle keys by libtrust id; every key by thumbprint or JWKS id; the bundle's certificates."""

    by_libtrust: Mapping[str, PublicKey]
    by_id: Mapping[str, tuple[PublicKey, ...]]
    certificates: tuple[x509.Certificate, ...] = ()
    by_kid: Mapping[str, tuple[Candidate, ...]] = field(init=False)  # both, precomputed for the hot path

    def __post_init__(self) -> None:
        by_kid = {kid: tuple(Candidate(key) for key in keys) for kid, keys in self.by_id.items()}
        for kid, key in self.by_libtrust.items():
            by_kid[kid] = (*by_kid.get(kid, ()), Candidate(key, libtrust=True))
        object.__setattr__(self, "by_kid", by_kid)

    @classmethod
    def build(
        cls,
        certificates: Iterable[x509.Certificate],
        jwks: Mapping[str, PublicKey] | None = None,
        *,
        v3_0_ec_quirk: bool = False,
    ) -> TrustedKeys:
        certificates = tuple(certificates)
        by_libtrust: dict[str, PublicKey] = {}
        by_id: dict[str, list[PublicKey]] = {}
        quirk: dict[str, PublicKey] = {}
        for certificate in certificates:
            key = certificate.public_key()
            if not isinstance(key, PUBLIC_KEY_TYPES):
                continue
            for kid in thumbprints(key):
                _add(by_id, kid, key)
            if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
                by_libtrust[libtrust_kid(key)] = key  # libtrust knows RSA and EC only
            if v3_0_ec_quirk and isinstance(key, ec.EllipticCurvePublicKey):
                quirk[generator_kid(key.curve)] = key  # the last key of the curve, as 3.0.0's map keeps it
        for kid, key in [*(jwks or {}).items(), *quirk.items()]:
            _add(by_id, kid, key)
        return cls(by_libtrust, {kid: tuple(keys) for kid, keys in by_id.items()}, certificates)

    def for_kid(self, kid: object) -> tuple[Candidate, ...]:
        candidates = self.by_kid.get(kid) if isinstance(kid, str) else None
        if candidates is None:
            raise TokenError("token has no kid of a trusted key")
        return candidates

    def for_jwk(self, jwk: object, now: float) -> tuple[Candidate, ...]:
        """Trusted keys a ``jwk`` header names: its chain's leaf, a bundle key with its libtrust id
        (2.8, GitLab), or the trusted key its ``kid`` names (3.x)."""
        key = public_key_of_jwk(jwk)
        if key is None or not isinstance(jwk, dict) or "d" in jwk:
            raise TokenError("token jwk header is not a public key")
        if jwk.get("x5c"):
            leaf = self.for_chain(jwk["x5c"], now)
            if not same_key(leaf, key):
                raise TokenError("token jwk does not match its certificate chain")
            return (Candidate(leaf),)
        kid = jwk.get("kid")
        candidates = [Candidate(trusted) for trusted in self.by_id.get(kid, ())] if isinstance(kid, str) else []
        if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey) and kid in (None, libtrust_kid(key)):
            trusted = self.by_libtrust.get(libtrust_kid(key))  # libtrust refuses a jwk whose kid is not its id
            if trusted is not None:
                candidates.append(Candidate(trusted, libtrust=True))
        if not candidates:
            raise TokenError("token jwk header names no trusted key")
        return tuple(candidates)

    def for_chain(self, x5c: object, now: float) -> PublicKey:
        """The leaf key of an ``x5c`` chain that verifies to the bundle at ``now``."""
        if not isinstance(x5c, list) or not x5c or not all(isinstance(item, str) for item in x5c):
            raise TokenError("token x5c header is not a list of certificates")
        try:
            chain = [x509.load_der_x509_certificate(base64.b64decode(item, validate=True)) for item in x5c]
        except (ValueError, binascii.Error):
            raise TokenError("token x5c certificate unreadable") from None
        leaf, when = chain[0], datetime.datetime.fromtimestamp(now, datetime.UTC)
        if not (self._verifies(leaf, chain[1:], when) or (len(chain) == 1 and self._issued_by_bundle(leaf, when))):
            raise TokenError("token x5c chain does not verify to the bundle")
        key = leaf.public_key()
        if not isinstance(key, PUBLIC_KEY_TYPES):
            raise TokenError("token x5c leaf key is not RSA, EC or Ed25519")
        return key

    def _verifies(self, leaf: x509.Certificate, intermediates: list[x509.Certificate], when: Any) -> bool:
        builder = PolicyBuilder().store(Store(list(self.certificates))).time(when)
        verifier = builder.extension_policies(ca_policy=CA_POLICY, ee_policy=EE_POLICY).build_client_verifier()
        try:
            verifier.verify(leaf, intermediates)
        except VerificationError:
            return False
        return True

    def _issued_by_bundle(self, leaf: x509.Certificate, when: datetime.datetime) -> bool:
        """Go accepts a leaf signed by a root without basicConstraints, or by an Ed25519 root."""
        for root in self.certificates:
            if root.subject != leaf.issuer or not (_valid_at(root, when) and _valid_at(leaf, when)):
                continue
            try:
                leaf.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
        return False


def _valid_at(certificate: x509.Certificate, when: datetime.datetime) -> bool:
    return certificate.not_valid_before_utc <= when <= certificate.not_valid_after_utc


def _add(index: dict[str, list[PublicKey]], kid: str, key: PublicKey) -> None:
    keys = index.setdefault(kid, [])
    if not any(same_key(key, known) for known in keys):
        keys.append(key)


def certificate_for_key(certificates: Iterable[x509.Certificate], key: PublicKey) -> x509.Certificate | None:
    """The first certificate whose public key is ``key`` (the signing key's own certificate)."""
    for certificate in certificates:
        candidate = certificate.public_key()
        if isinstance(candidate, PUBLIC_KEY_TYPES) and same_key(candidate, key):
            return certificate
    return None
