"""Python's smtplib (a real, widely used SMTP client) against the real tern binary."""

import smtplib
import socket
import ssl
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

import pytest

HOST = "127.0.0.1"


def tls_context():
    # The fixture server uses its self-signed certificate; the test checks TLS, not the PKI.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def text_message(sender, to, subject):
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Sent by smtplib from the Tern test suite.\n")
    return msg


def wire_bytes(msg):
    # smtplib sends bytes as given: they must already have CRLF line endings (a bare LF is
    # refused as SMTP smuggling protection: see test_bare_lf_bytes_are_refused).
    return msg.as_bytes(policy=SMTP_POLICY)


def queued_id(reply_text):
    text = reply_text.decode() if isinstance(reply_text, bytes) else reply_text
    assert text.startswith("2.0.0 "), text
    assert "queued as " in text, text
    return text.split("queued as ", 1)[1].split()[0]


def test_normal_send_is_queued_and_spooled(tern_server):
    server = tern_server()
    with smtplib.SMTP(HOST, server.smtp_port, local_hostname="py.client.test", timeout=30) as s:
        code, _ = s.ehlo()
        assert code == 250
        assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("enhancedstatuscodes")
        assert s.sendmail("py@client.test", ["one@elsewhere.test"], wire_bytes(text_message("py@client.test", "one@elsewhere.test", "first"))) == {}
        # The low-level calls expose the DATA reply and its queue id.
        assert s.mail("py@client.test")[0] == 250
        assert s.rcpt("two@elsewhere.test")[0] == 250
        code, text = s.data(wire_bytes(text_message("py@client.test", "two@elsewhere.test", "second")))
        assert code == 250
        msg_id = queued_id(text)
    server.stop()
    spool = server.spool_list()
    assert len(spool) == 2
    entry = next(e for e in spool if e["id"] == msg_id)
    assert entry["sender"] == "py@client.test"
    assert entry["recipients"] == ["two@elsewhere.test"]


def test_bare_lf_bytes_are_refused(tern_server):
    # smtplib passes bytes through unchanged, so "\n" line endings reach the server as bare LFs:
    # refused with 550 5.6.0 by default, accepted with bare_line_endings = "normalize".
    raw = text_message("py@client.test", "x@elsewhere.test", "lf").as_bytes()
    assert b"\n" in raw and b"\r\n" not in raw
    server = tern_server()
    with smtplib.SMTP(HOST, server.smtp_port, timeout=30) as s:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("py@client.test", ["x@elsewhere.test"], raw)
        assert (e.value.smtp_code, e.value.smtp_error[:5]) == (550, b"5.6.0")
    lenient = tern_server(smtp={"bare_line_endings": "normalize"})
    with smtplib.SMTP(HOST, lenient.smtp_port, timeout=30) as s:
        assert s.sendmail("py@client.test", ["x@elsewhere.test"], raw) == {}


def test_send_message_with_utf8_addresses_uses_smtputf8(tern_server):
    server = tern_server()
    msg = text_message("José <josé@client.test>", "用户 <用户@elsewhere.test>", "Grüße")
    with smtplib.SMTP(HOST, server.smtp_port, local_hostname="py.client.test", timeout=30) as s:
        s.ehlo()
        assert s.has_extn("smtputf8")
        # send_message sees non-ASCII addresses and sends MAIL FROM ... SMTPUTF8.
        assert s.send_message(msg) == {}
    server.stop()
    spool = server.spool_list()
    assert [(e["sender"], e["recipients"]) for e in spool] == [("josé@client.test", ["用户@elsewhere.test"])]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_starttls_and_login_on_submission(tern_server, mechanism):
    server = tern_server(users={"alice": "s3cret"})
    with smtplib.SMTP(HOST, server.submission_port, local_hostname="py.client.test", timeout=30) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        assert not s.has_extn("auth"), "AUTH must not be offered before TLS"
        code, _ = s.starttls(context=tls_context())
        assert code == 220
        s.ehlo()
        assert not s.has_extn("starttls")
        mechs = s.esmtp_features["auth"].upper().split()
        assert "PLAIN" in mechs and "LOGIN" in mechs
        s.user, s.password = "alice", "s3cret"
        authobject = s.auth_plain if mechanism == "PLAIN" else s.auth_login
        code, text = s.auth(mechanism, authobject, initial_response_ok=(mechanism == "PLAIN"))
        assert code == 235 and text.startswith(b"2.7.0"), (code, text)
        assert s.sendmail("alice@client.test", ["bob@elsewhere.test"], wire_bytes(text_message("alice@client.test", "bob@elsewhere.test", "auth"))) == {}


def test_login_with_wrong_password_is_535(tern_server):
    server = tern_server(users={"alice": "s3cret"})
    with smtplib.SMTP(HOST, server.submission_port, timeout=30) as s:
        s.starttls(context=tls_context())
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("alice", "wrong")
        assert e.value.smtp_code == 535
        assert e.value.smtp_error.startswith(b"5.7.8")


def test_smtp_ssl_on_submissions(tern_server):
    server = tern_server(users={"alice": "s3cret"})
    with smtplib.SMTP_SSL(HOST, server.submissions_port, context=tls_context(), timeout=30) as s:
        s.ehlo()
        assert not s.has_extn("starttls")
        s.login("alice", "s3cret")
        assert s.sendmail("alice@client.test", ["bob@elsewhere.test"], b"From: <alice@client.test>\r\nSubject: ssl\r\n\r\nimplicit tls\r\n") == {}


def read_reply(f):
    lines = []
    while True:
        line = f.readline().decode()
        assert line, f"connection closed after {lines}"
        lines.append(line.rstrip("\r\n"))
        if line[3:4] != "-":
            return int(lines[0][:3]), lines


def test_pipelined_rcpts_are_answered_in_order(tern_server):
    server = tern_server()
    with socket.create_connection((HOST, server.smtp_port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = sock.makefile("rb")
        assert read_reply(f)[0] == 220
        sock.sendall(b"EHLO py.client.test\r\n")
        code, lines = read_reply(f)
        assert code == 250 and any(l[4:].upper() == "PIPELINING" for l in lines)
        rcpts = [f"r{i}@elsewhere.test" for i in range(5)]
        batch = "MAIL FROM:<py@client.test>\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts) + "DATA\r\n"
        sock.sendall(batch.encode())
        assert read_reply(f)[0] == 250
        for _ in rcpts:
            code, lines = read_reply(f)
            assert code == 250, lines
        assert read_reply(f)[0] == 354
        sock.sendall(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        code, lines = read_reply(f)
        assert code == 250, lines
        msg_id = queued_id(lines[-1][4:])
        assert read_reply(f)[0] == 221
    server.stop()
    spool = server.spool_list()
    assert [e["recipients"] for e in spool if e["id"] == msg_id] == [rcpts]


def test_error_codes(tern_server):
    server = tern_server(relay={"networks": ["127.0.0.1/32"], "domains": ["example.test"]}, limits={"message_size": 10000})
    with smtplib.SMTP(HOST, server.smtp_port, timeout=30) as s:
        # Before EHLO: sequence error.
        code, text = s.docmd("MAIL", "FROM:<a@client.test>")
        assert (code, text[:5]) == (503, b"5.5.1"), (code, text)
        s.ehlo("py.client.test")
        code, text = s.docmd("FROBNICATE")
        assert (code, text[:5]) == (500, b"5.5.1"), (code, text)
        code, text = s.rcpt("b@elsewhere.test")
        assert (code, text[:5]) == (503, b"5.5.1"), (code, text)
        code, text = s.docmd("MAIL", "FROM:<not an address>")
        assert (code, text[:5]) == (501, b"5.1.7"), (code, text)
        code, text = s.mail("a@client.test", ["SIZE=20000"])
        assert (code, text[:5]) == (552, b"5.3.4"), (code, text)
        code, text = s.mail("a@client.test", ["FROB=1"])
        assert (code, text[:5]) == (555, b"5.5.4"), (code, text)
        code, text = s.mail("a@client.test")
        assert code == 250, text
        code, text = s.docmd("DATA")
        assert (code, text[:5]) == (503, b"5.5.1"), (code, text)
        code, text = s.noop()
        assert (code, text[:5]) == (250, b"2.0.0"), (code, text)
    # From outside relay.networks: relaying is refused, the relay domain is fine.
    with smtplib.SMTP(HOST, server.smtp_port, timeout=30, source_address=("127.0.0.2", 0)) as s:
        s.ehlo("outside.test")
        assert s.mail("a@outside.test")[0] == 250
        code, text = s.rcpt("victim@elsewhere.test")
        assert (code, text[:5]) == (554, b"5.7.1"), (code, text)
        code, text = s.rcpt("user@example.test")
        assert code == 250, text
        code, text = s.docmd("QUIT")
        assert (code, text[:5]) == (221, b"2.0.0"), (code, text)
