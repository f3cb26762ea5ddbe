"""Configuration: defaults, TOML, flags, and precise errors (exit code 2 naming the key)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config import FIELDS, Config, load_config
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_safe():
    c = load_config(None, {})
    assert (c.listen_host, c.listen_port, c.insecure, c.upstream_ca) == ("127.0.0.1", 8080, False, ())


def test_example_config_documents_every_key_with_its_default():
    text = (ROOT / "config.example.toml").read_text()
    data = tomllib.loads(text)
    for key in FIELDS:
        assert f"{key} =" in text, f"config.example.toml does not document {key}"
    for key, value in data.items():
        default = getattr(Config(), key)
        assert value == (list(default) if isinstance(default, tuple) else default), key
    assert load_config(str(ROOT / "config.example.toml"), {}) == Config()


def test_flags_override_the_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('listen_port = 9000\nverbosity = 2\n')
    c = load_config(str(f), {"listen_port": 9001})
    assert c.listen_port == 9001 and c.verbosity == 2


@pytest.mark.parametrize(
    "text,needle",
    [
        ("listen_prot = 1\n", "unknown key 'listen_prot'"),
        ('listen_port = "x"\n', "'listen_port': must be an integer"),
        ("listen_port = 70000\n", "'listen_port'"),
        ('ca_key_type = "dsa"\n', "'ca_key_type'"),
        ("insecure = 1\n", "'insecure': must be true or false"),
        ('upstream_ca = ["/nonexistent/ca.pem"]\n', "file not found: /nonexistent/ca.pem"),
        ("handshake_timeout = -1\n", "'handshake_timeout'"),
        ('listen_host = "not a host"\n', "'listen_host'"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, needle):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        load_config(str(f), {})


def test_cli_exits_2_with_the_key_named(tmp_path, capsys):
    f = tmp_path / "c.toml"
    f.write_text("bogus_key = true\n")
    assert main(["--config", str(f), "--confdir", str(tmp_path / "conf")]) == 2
    err = capsys.readouterr().err
    assert "bogus_key" in err and "Traceback" not in err
    assert main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
