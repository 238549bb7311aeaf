"""SSH sessions and the recordings' disk: a gateway whose recordings disk has less free
space than it keeps (gateway.recording_min_free_mib) starts no session, so nothing runs
unrecorded; the client is told why. (Running out mid-session: tests/test_recording.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keyturn.config import load_config
from keyturn.errors import ConfigError
from tests.conftest import Keyturn, LocalPostgres
from tests.ssh_attack_support import ssh, sshd, start_gateway  # noqa: F401
from tests.ssh_support import LocalSSHD


@pytest.fixture(scope="module")
def kt(pg: LocalPostgres, sshd: LocalSSHD,  # noqa: F811
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyturn]:
    # 1 PiB kept free: more than any disk here has.
    k = start_gateway(pg, sshd, tmp_path_factory.mktemp("kt-ssh-disk"),
                      gateway="  recording_min_free_mib: 1073741824\n")
    yield k
    k.stop()


def test_no_session_starts_when_it_could_not_be_recorded(kt: Keyturn) -> None:
    res = ssh(kt, "echo started-ok")  # allowed (a read): refused for the disk alone
    assert res.returncode == 255, res
    assert "recording_min_free_mib" in res.stderr
    assert "not started unrecorded" in res.stderr
    assert "started-ok" not in res.stdout
    assert "recording" in kt.log()[-5000:]


@pytest.mark.parametrize("value", ["-1", "lots", "true", "1.5"])
def test_a_bad_free_space_setting_is_refused_with_its_place(kt: Keyturn, value: str,
                                                            tmp_path) -> None:
    text = kt.config.read_text().replace("recording_min_free_mib: 1073741824",
                                         f"recording_min_free_mib: {value}")
    bad = tmp_path / "keyturn.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match="gateway.recording_min_free_mib"):
        load_config(str(bad))
