"""DKIM interoperability with an independent implementation, dkimpy (with PyNaCl for Ed25519).

Tern's keys (`tern dkim keygen`) and signatures (`tern dkim sign`) are checked by dkimpy's
verifier, which is handed keygen's TXT record instead of DNS; and dkimpy's signatures, made
with keys dkimpy generated itself (dkim.dknewkey), are checked by `tern dkim verify --txt`.
"""

import re
import subprocess

import dkim
import dkim.dknewkey
import pytest
from conftest import tern_bin

DOMAIN = "example.org"
SELECTOR = "s2026"
RECORD_NAME = f"{SELECTOR}._domainkey.{DOMAIN}"

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Cc: carol@example.net\r\n"
    b"Subject: DKIM interop\r\n"
    b"Date: Sun, 22 Nov 2026 18:00:00 +0000\r\n"
    b"Message-ID: <interop-1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Not-Signed: whatever\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"  this line has   odd    spacing   \r\n"
    b"\r\n"
    b"-- \r\n"
    b"Alice\r\n"
    b"\r\n"
    b"\r\n"
)

ALGORITHMS = ["rsa-sha256", "ed25519-sha256"]


def run(args, input=None, cwd=None):
    return subprocess.run([tern_bin(), *args], input=input, capture_output=True, cwd=cwd, timeout=120)


def keygen(tmp_path, algorithm, selector=SELECTOR):
    """Runs `tern dkim keygen`; returns (record value, [[dkim]] snippet, zone line)."""
    out = run(["dkim", "keygen", DOMAIN, selector, "--algorithm", algorithm], cwd=tmp_path)
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    zone = next(line for line in text.splitlines() if " IN TXT " in line)
    m = re.fullmatch(r'(\S+) IN TXT \( (.*) \)', zone)
    assert m, zone
    assert m.group(1) == f"{selector}._domainkey.{DOMAIN}."
    strings = re.findall(r'"([^"]*)"', m.group(2))
    assert strings and all(len(s) <= 255 for s in strings), zone
    snippet = text[text.index("[[dkim]]"):]
    key_file = tmp_path / f"{DOMAIN}.{selector}.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    return "".join(strings), snippet, zone


def dns_from(records):
    """A dkimpy dnsfunc answering from {name: record} (names without the trailing dot)."""

    def dnsfunc(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        return records.get(name.rstrip(".").lower(), "").encode()

    return dnsfunc


def tern_sign(tmp_path, snippets, message=MESSAGE):
    config = tmp_path / "tern.toml"
    config.write_text("\n".join(snippets))
    out = run(["dkim", "sign", "--config", str(config)], input=message)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.endswith(message)
    return out.stdout


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tern_signature_verifies_with_dkimpy(tmp_path, algorithm):
    record, snippet, _ = keygen(tmp_path, algorithm)
    assert record.startswith(f"v=DKIM1; k={algorithm.split('-')[0]}; p=")
    signed = tern_sign(tmp_path, [snippet])
    assert signed.count(b"DKIM-Signature:") == 1
    header = signed[: signed.index(b"From:")].decode()
    assert f"a={algorithm};" in header and "c=relaxed/relaxed;" in header
    dnsfunc = dns_from({RECORD_NAME: record})
    assert dkim.verify(signed, dnsfunc=dnsfunc), "dkimpy rejected Tern's signature"

    # Tampering is caught: the body, a signed header, or a second From: (oversigned).
    assert not dkim.verify(signed.replace(b"Hello Bob", b"Hello Eve"), dnsfunc=dnsfunc)
    assert not dkim.verify(signed.replace(b"Subject: DKIM", b"Subject: XKIM"), dnsfunc=dnsfunc)
    extra_from = signed.replace(b"To: Bob", b"From: mallory@evil.example\r\nTo: Bob")
    assert not dkim.verify(extra_from, dnsfunc=dnsfunc)
    # An unsigned header may change; relaxed canonicalization ignores whitespace changes.
    assert dkim.verify(signed.replace(b"whatever", b"changed"), dnsfunc=dnsfunc)
    assert dkim.verify(signed.replace(b"Subject: DKIM", b"Subject:   DKIM"), dnsfunc=dnsfunc)


def test_two_keys_give_two_signatures_both_valid_for_dkimpy(tmp_path):
    rsa_record, rsa_snippet, _ = keygen(tmp_path, "rsa-sha256", "r1")
    ed_record, ed_snippet, _ = keygen(tmp_path, "ed25519-sha256", "e1")
    signed = tern_sign(tmp_path, [rsa_snippet, ed_snippet])
    assert signed.count(b"DKIM-Signature:") == 2
    dnsfunc = dns_from({f"r1._domainkey.{DOMAIN}": rsa_record, f"e1._domainkey.{DOMAIN}": ed_record})
    d = dkim.DKIM(signed)
    assert d.verify(idx=0, dnsfunc=dnsfunc)
    assert d.verify(idx=1, dnsfunc=dnsfunc)


def test_mail_from_another_domain_is_not_signed(tmp_path):
    _, snippet, _ = keygen(tmp_path, "ed25519-sha256")
    config = tmp_path / "tern.toml"
    config.write_text(snippet)
    other = MESSAGE.replace(b"alice@example.org", b"alice@example.com")
    out = run(["dkim", "sign", "--config", str(config)], input=other)
    assert out.returncode != 0
    assert b"example.com" in out.stderr and out.stdout == b""


def dkimpy_key(tmp_path, algorithm):
    """A key generated by dkimpy's own tooling: (private key for dkim.sign, TXT record)."""
    key_file, dns_file = tmp_path / "dkimpy.key", tmp_path / "dkimpy.dns"
    if algorithm == "rsa-sha256":
        dkim.dknewkey.GenRSAKeys(str(key_file), verbose=False)
        dkim.dknewkey.ExtractRSADnsPublicKey(str(key_file), str(dns_file), verbose=False)
    else:
        priv = dkim.dknewkey.GenEd25519Keys(str(key_file), verbose=False)
        dkim.dknewkey.ExtractEd25519PublicKey(str(dns_file), priv, verbose=False)
    return key_file.read_bytes(), dns_file.read_text().strip()


@pytest.mark.parametrize("canonicalize", [b"relaxed/relaxed", b"simple/simple"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dkimpy_signature_verifies_with_tern(tmp_path, algorithm, canonicalize):
    private_key, record = dkimpy_key(tmp_path, algorithm)
    signature = dkim.sign(
        MESSAGE,
        SELECTOR.encode(),
        DOMAIN.encode(),
        private_key,
        canonicalize=tuple(canonicalize.split(b"/")),
        signature_algorithm=algorithm.encode(),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    signed = signature + MESSAGE
    assert dkim.verify(signed, dnsfunc=dns_from({RECORD_NAME: record})), "dkimpy self-check"
    txt = f"{RECORD_NAME}={record}"

    out = run(["dkim", "verify", "--txt", txt], input=signed)
    assert out.returncode == 0, (out.stdout + out.stderr).decode()
    assert out.stdout.decode().splitlines() == [f"pass d={DOMAIN} s={SELECTOR} a={algorithm}"]

    out = run(["dkim", "verify", "--txt", txt], input=signed.replace(b"Hello Bob", b"Hello Eve"))
    assert out.returncode != 0
    assert not out.stdout.startswith(b"pass"), out.stdout

    out = run(["dkim", "verify", "--txt", txt], input=signed.replace(b"Subject: DKIM", b"Subject: XKIM"))
    assert out.returncode != 0
    assert out.stdout.startswith(b"fail"), out.stdout

    # A key record for another selector does not verify it.
    out = run(["dkim", "verify", "--txt", f"other._domainkey.{DOMAIN}={record}"], input=signed)
    assert out.returncode != 0


def test_verify_without_signature_fails():
    out = run(["dkim", "verify", "--txt", f"{RECORD_NAME}=v=DKIM1; k=ed25519; p=AAAA"], input=MESSAGE)
    assert out.returncode != 0
    assert b"no DKIM-Signature" in out.stderr
