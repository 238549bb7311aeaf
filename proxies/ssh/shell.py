"""What a shell command line does: the classifier of SSH exec requests.

``classify(text)`` parses a command line the way the target's shell would (bashlex, a
port of bash's own grammar) and returns one ``ShellAction``: the riskiest class of every
simple command in it (pipelines, lists, subshells, loops, function bodies, ``sudo``/``env``
/``xargs``/``find -exec`` wrappers and ``sh -c`` bodies included), the programs it runs
and the paths it names.

Classes, least to most risky (``SSH`` vocabulary, registered by proxies/ssh/register.py):
``read`` (looks, changes nothing), ``write`` (creates or changes files), ``admin``
(services, processes, packages, users, permissions), ``destructive`` (removes or overwrites
data for good), ``shell`` (an interactive shell: the gateway cannot know what will be typed),
``unknown`` (anything this module cannot see into).

Fail closed: a parse error, a construct bashlex does not implement (arithmetic,
``[[ ]]``, ``case``), command or process substitution, a variable or glob in command
position, a program not in the tables below, a program named by a path outside the system
directories (``./ls``, ``/tmp/ls``) or through ``..``, an interpreter given a script or
stdin (``sh``, ``python -c``, ``perl -e``, ``base64 -d | sh``), ``eval``/``source`` of
anything that is not a literal, a variable that changes how commands are found or run (``PATH=``,
``LD_PRELOAD=``, ``BASH_ENV=``) — all are ``unknown``, the riskiest class.

What the line may leave uncertain is taken at its riskiest: a ``cd`` may fail, be skipped
or run in a subshell, so relative paths are resolved against every directory the shell
may be in (``*`` when one is unknown); a variable is followed only while nothing else may
change it (prefix assignments, builtins, loops and nested code make it unknown); a
recursive program's directory operands also stand for everything below them
(``DIR/*``); text bash may evaluate as arithmetic with subscripts (``printf -v 'a[x]'``,
values assigned where ``declare -i`` may be on) is unknown.

This module is sans-I/O: it must not import asyncio, sockets or asyncssh, and must never
raise on any input (a hypothesis test feeds it arbitrary text).
"""

from __future__ import annotations

import copy
import fnmatch
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import bashlex
import bashlex.errors

from proxies.ssh.register import CLASSES

_RISK = {c: i for i, c in enumerate(CLASSES)}

#: Where a program named by its full path is still that program.
SYSTEM_DIRS = frozenset({"/bin", "/usr/bin", "/sbin", "/usr/sbin", "/usr/local/bin",
                         "/usr/local/sbin"})

READ = frozenset("""
    ls ll dir cat head tail grep egrep fgrep zgrep rg ag wc sort uniq cut tr
    column nl tac rev od hexdump xxd strings file stat du df free uptime w who whoami id
    groups hostname hostnamectl uname date cal echo printf true false pwd ps pgrep pstree
    top htop vmstat iostat mpstat sar lsof ss netstat ip ifconfig ping traceroute dig host
    nslookup getent env printenv which type whereis locate readlink realpath basename
    dirname diff cmp comm md5sum sha1sum sha256sum sha512sum cksum b2sum test [ sleep seq
    yes jq yq lsblk blkid lscpu lsmem lsusb lspci lsmod dmesg last lastlog journalctl
    id jobs wait read cd : timedatectl loginctl nproc arch tty zcat bzcat xzcat
    base64 expr numfmt ldd getconf locale
""".split())
WRITE = frozenset("""
    touch mkdir cp mv ln install tee rsync scp curl wget git tar gzip gunzip bzip2 bunzip2
    xz unxz zip unzip patch split csplit mktemp
""".split())
ADMIN = frozenset("""
    systemctl service kill pkill killall reboot shutdown halt poweroff init telinit
    useradd userdel usermod groupadd groupdel groupmod passwd chpasswd chage chmod chown
    chgrp chattr setfacl mount umount swapon swapoff iptables ip6tables nft ufw firewall-cmd
    apt apt-get aptitude dpkg yum dnf rpm zypper apk pip pip3 npm snap flatpak crontab at
    sysctl modprobe rmmod insmod docker podman kubectl helm ctr crictl
    visudo update-alternatives ldconfig renice nice ionice nohup setsid logger stty
""".split())
DESTRUCTIVE = frozenset("""
    rm rmdir shred dd mkfs wipefs fdisk sfdisk parted gdisk truncate unlink fstrim
    blkdiscard mke2fs mkswap
""".split())
#: Interpreters: with a literal ``-c`` body a POSIX shell is parsed too; anything else
#: they run (a script, stdin, another language's ``-c``/``-e``) is unknown.
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "busybox", "fish", "csh",
                    "tcsh"})
INTERPRETERS = frozenset({"python", "python2", "python3", "perl", "ruby", "node", "nodejs",
                          "php", "lua", "tclsh", "awk", "gawk", "mawk", "nawk", "jshell",
                          "psql", "mysql", "sqlite3", "ssh", "expect", "osascript", "vim",
                          "vi", "nvim", "emacs", "nano", "ed", "ex", "script", "tmux",
                          "screen", "gdb", "strace", "ltrace", "watch", "parallel",
                          "make", "cmake", "ninja", "man", "less", "more", "most", "zless",
                          "zmore", "pg", "git", "at", "batch", "nsenter", "unshare",
                          "setpriv", "runuser", "sg", "chroot", "systemd-run", "tree"})
#: Programs whose subcommand decides: (program, subcommands that only read).
READ_SUBCOMMANDS = {
    "systemctl": frozenset({"status", "show", "cat", "list-units", "list-unit-files",
                            "list-timers", "list-sockets", "list-dependencies", "is-active",
                            "is-enabled", "is-failed", "is-system-running"}),
    "service": frozenset({"--status-all"}),
    "git": frozenset({"status", "log", "diff", "show", "branch", "rev-parse", "describe",
                      "blame", "shortlog", "ls-files", "ls-tree", "cat-file", "grep",
                      "--version"}),
    "docker": frozenset({"ps", "images", "logs", "inspect", "version", "info", "stats",
                         "top", "port", "diff", "history"}),
    "podman": frozenset({"ps", "images", "logs", "inspect", "version", "info"}),
    "kubectl": frozenset({"get", "describe", "logs", "top", "version", "explain",
                          "api-resources", "api-versions", "cluster-info"}),
    "apt": frozenset({"list", "show", "search", "policy"}),
    "dpkg": frozenset({"-l", "--list", "-L", "--listfiles", "-s", "--status", "-S",
                       "--search"}),
    "crontab": frozenset({"-l"}),
    "ip": frozenset({"addr", "a", "address", "route", "r", "link", "l", "neigh", "n",
                     "rule"}),
    "timedatectl": frozenset({"status", "show", "list-timezones", "timesync-status",
                              "show-timesync"}),
    "hostnamectl": frozenset({"status"}),
    "loginctl": frozenset({"list-sessions", "list-users", "list-seats", "show-session",
                           "show-user", "session-status", "user-status"}),
}
#: Short options that take a value, per program (the letters after one are its value).
VALUED_SHORT = {"tar": "bCfFgHIKLNTVX", "sort": "kotSTy", "sed": "efl", "date": "dfrs",
                "dmesg": "Fflns", "scp": "cFiJlPoS", "hostname": "F"}
#: Programs that show their output in a pager (less) when it is a terminal: less runs
#: shell commands typed in it (systemd's secure mode depends on the host's logind).
PAGING = frozenset({"systemctl", "journalctl", "loginctl", "timedatectl", "hostnamectl",
                    "localectl", "busctl", "networkctl", "resolvectl", "coredumpctl",
                    "machinectl", "bootctl", "dmesg"})
#: Options that make an otherwise known program run a command of the caller's choosing.
EXEC_OPTIONS: dict[str, tuple[str, ...]] = {
    "git": ("-c", "--exec-path", "--config-env", "-C"),
    "rsync": ("-e", "--rsh", "--rsync-path"),
    "tar": ("-I", "--use-compress-program", "--to-command", "--checkpoint-action",
            "-F", "--info-script", "--new-volume-script", "--rsh-command", "--rmt-command"),
    "sort": ("--compress-program",),
    "rg": ("--pre",),
    "ag": ("--pager",),
    "zip": ("-T", "-TT", "--unzip-command"),
    "scp": ("-S", "-o", "-F"),
    "curl": ("-K", "--config"),
    "less": ("-k", "--lesskey-file"),
    "journalctl": ("--vacuum-size", "--vacuum-time", "--vacuum-files", "--rotate",
                   "--flush", "--relinquish-var", "--setup-keys", "--sync",
                   "--update-catalog", "--smart-relinquish-var"),
}
#: git subcommands that change the repository (the read-only ones are above); any other
#: name may be an alias or an external git-<name> program.
GIT_WRITES = frozenset({"add", "commit", "push", "pull", "fetch", "checkout", "switch",
                        "merge", "rebase", "reset", "stash", "tag", "clone", "init", "rm",
                        "mv", "restore", "cherry-pick", "revert", "apply", "am", "clean",
                        "gc", "config", "remote", "submodule", "worktree", "branch",
                        "notes", "prune", "repack", "bisect", "sparse-checkout", "lfs"})

#: Upper-case variables a command line may set: environment variables that change how
#: programs run (``PATH``, ``LD_PRELOAD``, ``GIT_PAGER``, ``LESSOPEN``...) are upper case
#: and too many to list, so every other upper-case name is refused (lower-case names are
#: the shell's own variables).
SAFE_VARS = frozenset({"LANG", "LANGUAGE", "TZ", "TERM", "COLUMNS", "LINES", "NO_COLOR",
                       "CLICOLOR", "FORCE_COLOR", "SYSTEMD_COLORS", "DEBIAN_FRONTEND"})
#: Listed for the reasons given when one is set (every upper-case name outside
#: SAFE_VARS is refused anyway).
DANGEROUS_VARS = frozenset({"PATH", "BASH_ENV", "ENV", "IFS", "PS4", "PROMPT_COMMAND",
                            "SHELLOPTS", "BASHOPTS", "GLOBIGNORE", "CDPATH", "HOME",
                            "PERL5LIB", "PERL5OPT", "PYTHONPATH", "PYTHONSTARTUP",
                            "PYTHONHOME", "RUBYOPT", "RUBYLIB", "NODE_OPTIONS", "GIT_SSH",
                            "GIT_SSH_COMMAND", "GIT_EXEC_PATH", "GIT_CONFIG", "EDITOR",
                            "VISUAL", "PAGER", "GCONV_PATH", "HOSTALIASES", "TMPDIR"})
#: Shell builtins that change how later words are run or found.
UNSEEABLE_BUILTINS = frozenset({"eval", "source", ".", "alias", "unalias", "shopt", "set",
                                "enable", "hash", "trap", "declare", "typeset", "export",
                                "builtin", "command", "exec", "let", "local", "readonly",
                                "function", "fc", "history", "bind", "complete", "mapfile",
                                "readarray", "coproc", "ulimit", "umask", "unset", "getopts",
                                "shift", "return", "exit", "break", "continue", "fg", "bg",
                                "disown", "caller", "compgen", "pushd",
                                "popd", "dirs", "suspend", "times", "logout"})
#: Wrappers that run the rest of their arguments as a command, with their options as
#: getopt reads them: (short options that take a value, short options whose value is
#: optional and attached, long options that take a value, long options whose value is
#: optional and given with ``=``). Every wrapper stops reading options at its first operand.
WRAPPERS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    "sudo": ("aCcDghpRrTtUu", "", (
        "--auth-type", "--close-from", "--login-class", "--chdir", "--group", "--host",
        "--prompt", "--chroot", "--role", "--command-timeout", "--type", "--other-user",
        "--user"), ("--preserve-env",)),
    "doas": ("Cu", "", (), ()),
    "env": ("uCS", "", ("--unset", "--chdir", "--split-string"),
            ("--default-signal", "--ignore-signal", "--block-signal")),
    "nice": ("n", "", ("--adjustment",), ()),
    "ionice": ("cnpPu", "", ("--class", "--classdata", "--pid", "--pgid", "--uid"), ()),
    "nohup": ("", "", (), ()),
    "setsid": ("", "", (), ()),
    "stdbuf": ("ioe", "", ("--input", "--output", "--error"), ()),
    "timeout": ("ks", "", ("--kill-after", "--signal"), ()),
    "chrt": ("", "", (), ()),
    "taskset": ("", "", (), ()),
    "xargs": ("aEILnsPd", "eil", (
        "--arg-file", "--delimiter", "--max-args", "--max-procs", "--max-chars",
        "--process-slot-var"), ("--eof", "--replace", "--max-lines")),
    "time": ("fo", "", ("--format", "--output"), ()),
    "flock": ("wE", "", ("--wait", "--timeout", "--conflict-exit-code"), ()),
}
#: Wrappers that raise privileges: the command they run is at least ``admin``.
ELEVATING = frozenset({"sudo", "doas"})
_GLOB = set("*?[{")


@dataclass(frozen=True)
class ShellAction:
    """One exec request as policy sees it (keyturn.request.Action)."""

    text: str
    cls: str
    reasons: tuple[str, ...] = ()
    programs: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    forbidden: str | None = None
    #: How it was parsed, for tickets: one line per simple command.
    commands: tuple[str, ...] = ()


@dataclass
class _Walk:
    cls: str = "read"
    reasons: list[str] = field(default_factory=list)
    programs: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    #: Every directory the shell may be in (``*``: anywhere, after ``cd $X``): a ``cd``
    #: may fail, be skipped or run in a subshell, so a relative path is resolved
    #: against each.
    cwds: tuple[str, ...] = ("~",)
    #: Where the last ``cd`` walked goes when it succeeds (for what follows ``&&``).
    cd_to: tuple[str, ...] | None = None
    #: Whether a variable may have the integer attribute (``declare -i``): a value
    #: assigned to it is evaluated as arithmetic, which expands subscripts again.
    integer: bool = False
    depth: int = 0
    #: Whether the command may have a terminal (its pagers then take commands).
    terminal: bool = True
    #: Above 0 while the commands walked write their output into a pipe or a file.
    piped: int = 0
    #: Above 0 inside a condition, loop, pipeline or background list: an assignment
    #: there may or may not happen.
    maybe: int = 0
    #: Shell variables set on the line: their literal value, or None when not known.
    vars: dict[str, str | None] = field(default_factory=dict)
    #: The text being walked (bashlex positions point into it).
    src: str = ""
    #: Inside a loop body's trial walk (loops nested in it are walked once).
    trial: bool = False

    def raise_to(self, cls: str, why: str) -> None:
        if why not in self.reasons:
            self.reasons.append(why)
        if _RISK[cls] > _RISK[self.cls]:
            self.cls = cls

    def path(self, word: str, under: bool = False) -> None:
        """Record ``word`` as a path (against every directory the shell may be in); with
        ``under``, everything below it too (``DIR/*``: a recursive program reaches it)."""
        for cwd in self.cwds:
            p = _resolve(word, cwd)
            for q in (p, _below(p)) if under else (p,):
                if q not in self.paths:
                    self.paths.append(q)

    def any_path(self) -> None:
        if "*" not in self.paths:
            self.paths.append("*")


class _Unknown(Exception):
    """Stop: the command line holds something that cannot be seen into."""


MAX_DEPTH = 8  # nested sh -c / eval bodies before the line counts as unknown
#: Longer command lines are not parsed: bashlex takes about 50 ms per KiB.
MAX_TEXT = 8 * 1024


def classify(text: str, *, terminal: bool = True) -> ShellAction:
    """The class, programs and paths of the command line ``text`` (never raises).
    ``terminal``: whether it runs with a terminal (the gateway knows; unknown counts as
    yes), where programs that page their output take commands."""
    walk = _Walk(terminal=terminal)
    # `declare -i` (anywhere, in any spelling) makes assignments arithmetic.
    walk.integer = bool(re.search(r"declare|typeset|local", re.sub(r"[\\'\"]", "", text)))
    if not text.strip():
        # An exec request with no command: SSH servers start the login shell for it.
        return ShellAction(text, "unknown", ("an empty command starts a shell on the host",),
                           ("*",), ("*",))
    if len(text) > MAX_TEXT:
        # Decided before any parsing: a long line would hold a thread for seconds.
        return ShellAction(text, "unknown", (
            f"a command line over {MAX_TEXT // 1024} KiB ({len(text)} bytes) is not "
            "analysed; put it in a script or split it",), ("*",), ("*",))
    try:
        _parse_into(walk, text)
    except _Unknown as exc:
        walk.raise_to("unknown", str(exc))
    except Exception as exc:  # noqa: BLE001 - bashlex raises many kinds; all fail closed
        walk.raise_to("unknown", f"the command line cannot be parsed ({type(exc).__name__})")
    if walk.cls == "unknown":
        # What could not be seen into may run anything, anywhere.
        walk.paths = ["*"]
        if not walk.programs:
            walk.programs = ["*"]
    return ShellAction(text, walk.cls, tuple(walk.reasons), tuple(walk.programs),
                       tuple(walk.paths), None, tuple(walk.commands))


def _parse_into(walk: _Walk, text: str) -> None:
    if walk.depth > MAX_DEPTH:
        raise _Unknown("commands nested too deeply to follow")
    if len(text) > MAX_TEXT:
        raise _Unknown(f"a command line over {MAX_TEXT} bytes is not analysed")
    if "\x00" in text:
        raise _Unknown("a NUL byte in the command line")
    if not text.strip():
        return
    for marker, what in (("$(", "command substitution"), ("`", "command substitution"),
                         ("${", "a ${...} expansion (it may hold a substitution or an "
                                "assignment)"), ("<(", "process substitution"),
                         (">(", "process substitution")):
        if marker in text:
            # Anywhere, quoted or in a here-document: bash expands them in more places
            # than a parse tree shows (${x:-$(cmd)}, ~$(cmd), here-document bodies).
            raise _Unknown(f"{what}: what runs depends on text keyturn does not analyse")
    try:
        trees = bashlex.parse(text)
    except NotImplementedError as exc:
        raise _Unknown(f"shell syntax keyturn does not analyse ({exc})") from None
    except (bashlex.errors.ParsingError, AttributeError, IndexError, TypeError,
            ValueError, AssertionError) as exc:
        raise _Unknown(f"the command line cannot be parsed "
                       f"({getattr(exc, 'message', exc) or type(exc).__name__})") from None
    saved = walk.src
    walk.src = text
    try:
        for tree in trees:
            _node(walk, tree)
    finally:
        walk.src = saved


def _union(*sets: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for s in sets:
        out += [c for c in s if c not in out]
    return tuple(out)


def _below(path: str) -> str:
    """The pattern for everything below ``path`` (``*`` matches ``/`` in rules too)."""
    if path == "*":
        return "*"
    return path.rstrip("/") + "/*"


def _and_or(walk: _Walk, elements: list[Any], ops: list[str]) -> None:
    """An and-or list (``a && b || c``): where each element starts and where the shell
    is after it. A ``cd`` that fails leaves the directory as it was; a ``&&`` after it
    runs only where it succeeded, a ``||`` only where it failed (or what came before)."""
    before = walk.cwds
    ok: tuple[str, ...] = before
    bad: tuple[str, ...] = ()
    for i, el in enumerate(elements):
        op = ops[i - 1] if i and i - 1 < len(ops) else None
        start = before if op is None else ok if op == "&&" else bad
        walk.cwds = start or before
        walk.cd_to = None
        _node(walk, el)
        after, cd_to = walk.cwds, walk.cd_to
        walk.cd_to = None
        succeeded, failed = (cd_to, start) if (
            cd_to is not None and el.kind == "command") else (after, after)
        if op is None:
            ok, bad = succeeded, failed
        elif op == "&&":
            ok, bad = succeeded, _union(bad, failed)
        else:
            ok, bad = _union(ok, succeeded), failed
    walk.cwds = _union(ok, bad) or before


def _loop_state(walk: _Walk, node: Any) -> None:
    """A loop body runs any number of times: walked once on a copy first, a directory or
    variable it changes is unknown where the real walk starts (the second time round)."""
    if walk.trial:
        # A loop inside a trial: the outer trial sees whatever this one changes (and
        # one trial per level keeps nested loops linear, not exponential).
        return
    trial = copy.deepcopy(walk)
    trial.reasons, trial.paths, trial.commands, trial.programs = [], [], [], []
    trial.trial = True
    for part in node.parts:
        if part.kind not in ("word", "reservedword"):
            _node(trial, part)
    if trial.cwds != walk.cwds:
        walk.cwds = _union(walk.cwds, trial.cwds, ("*",))
    for name, value in trial.vars.items():
        if walk.vars.get(name, "\0") != value:
            walk.vars[name] = None
    walk.integer = walk.integer or trial.integer


def _node(walk: _Walk, node: Any) -> None:
    kind = node.kind
    if kind == "command":
        _command(walk, node)
    elif kind == "list":
        parts = list(node.parts)
        redirects = list(getattr(node, "redirects", ()) or ())
        # An assignment after && || & may not happen for what follows.
        maybe = any(p.kind == "operator" and p.op in ("&&", "||", "&") for p in parts)
        walk.maybe += maybe
        try:
            elements: list[Any] = []
            ops: list[str] = []
            for part in [*parts, None]:
                if part is not None and part.kind == "operator" and part.op in ("&&", "||"):
                    ops.append(part.op)
                    continue
                if part is not None and part.kind != "operator":
                    elements.append(part)
                    continue
                if elements:
                    background = part is not None and part.op == "&"
                    before = walk.cwds
                    _and_or(walk, elements, ops)
                    if background:
                        walk.cwds = before  # a background job is a subshell
                elements, ops = [], []
        finally:
            walk.maybe -= maybe
        for r in redirects:
            _redirect(walk, r)
    elif kind in ("pipeline", "compound"):
        parts = list(getattr(node, "parts", None) or getattr(node, "list", None) or ())
        redirects = list(getattr(node, "redirects", ()) or ())
        # An assignment in a pipeline (a subshell), a compound, or after && || & may not
        # happen for what follows.
        maybe = kind != "list" or any(p.kind == "operator" and p.op in ("&&", "||", "&")
                                      for p in parts)
        out = _stdout_redirected(redirects)
        last = [p for p in parts if p.kind not in ("pipe", "operator")][-1:] \
            if kind == "pipeline" else parts
        # Each command of a pipeline runs in a subshell (the last one too, unless
        # lastpipe is on), and so does ( ... ): a cd there does not move the shell.
        subshell = kind == "pipeline" or bool(parts) and parts[0].kind == "reservedword" \
            and parts[0].word == "("
        before = walk.cwds
        saved_vars = dict(walk.vars)
        walk.maybe += maybe
        walk.piped += out
        try:
            for part in parts:
                piped = kind == "pipeline" and part.kind != "pipe" and part not in last
                walk.piped += piped
                if kind == "pipeline":
                    walk.cwds = before
                try:
                    _node(walk, part)
                finally:
                    walk.piped -= piped
        finally:
            walk.maybe -= maybe
            walk.piped -= out
        if subshell:
            walk.cwds = _union(before, walk.cwds) if kind == "pipeline" else before
            for name in set(walk.vars) | set(saved_vars):
                if walk.vars.get(name) != saved_vars.get(name):
                    walk.vars[name] = None  # set or not: not followed
        walk.cd_to = None
        for r in redirects:
            _redirect(walk, r)
    elif kind in ("if", "for", "while", "until"):
        if kind == "for":
            names = [p for p in node.parts if p.kind == "word"]
            if names:
                # for PATH in /tmp; do ls; done; for y in ... after declare -i y
                _set_by_builtin(walk, names[0].word, "for")
        walk.maybe += 1
        try:
            if kind != "if":
                _loop_state(walk, node)
            before = walk.cwds
            for part in node.parts:
                if part.kind == "word":
                    _word_expansions(walk, part)
                elif part.kind != "reservedword":
                    # Each branch may start where any earlier part left the shell.
                    walk.cwds = _union(before, walk.cwds)
                    _node(walk, part)
            walk.cwds = _union(before, walk.cwds)
            walk.cd_to = None
        finally:
            walk.maybe -= 1
    elif kind == "function":
        # A function runs its body wherever its name is called, in whatever directory
        # and order: not followed.
        raise _Unknown("a function definition (its name may shadow a program)")
    elif kind in ("operator", "pipe", "reservedword"):
        return
    elif kind == "redirect":
        _redirect(walk, node)
    else:
        raise _Unknown(f"shell construct {kind!r} is not analysed")


def _word_expansions(walk: _Walk, word: Any) -> None:
    """Expansions inside a word in argument position."""
    for part in getattr(word, "parts", ()) or ():
        if part.kind in ("commandsubstitution", "processsubstitution"):
            raise _Unknown("command substitution: its output becomes part of the command")
        if part.kind == "parameter" and not getattr(part, "value", None):
            raise _Unknown("a quoting form keyturn does not analyse ($'...' or $\"...\")")


def _has_expansion(word: Any) -> bool:
    return any(p.kind in ("parameter", "commandsubstitution", "processsubstitution")
               for p in getattr(word, "parts", ()) or ())


def _command(walk: _Walk, node: Any) -> None:
    words: list[Any] = []
    assignments: list[Any] = []
    for part in node.parts:
        if part.kind == "assignment":
            _assignment(walk, part)
            assignments.append(part)
        elif part.kind == "redirect":
            _redirect(walk, part)
        elif part.kind == "word":
            _word_expansions(walk, part)
            words.append(part)
        else:
            _node(walk, part)
    if not words:
        for part in assignments:  # `o=-o`: a shell variable for the rest of the line
            name, _eq, value = part.word.partition("=")
            raw = walk.src[part.pos[0]:part.pos[1]]
            known = not walk.maybe and not name.endswith("+") and raw == part.word and \
                not set(value) & set("$`\\'\"{}*?[~") and not walk.depth
            walk.vars[name.rstrip("+")] = value if known else None
        return
    if _has_expansion(words[0]):
        raise _Unknown("a variable or substitution in command position")
    argv: list[str] = []
    expanded: list[bool] = []
    risky: list[tuple[int, str]] = []
    for i, w in enumerate(words):
        raw = walk.src[w.pos[0]:w.pos[1]] if walk.src else w.word
        if i and _braces(raw):
            # Brace expansion makes several words (`{-o,F}` is `-o F`): expanded here
            # when the word is plain text, unknown otherwise.
            if raw != w.word or _has_expansion(w):
                raise _Unknown(f"brace expansion in a quoted or expanded word ({raw})")
            items = _brace_expand(raw)
            argv += items
            expanded += [False] * len(items)
            continue
        if not _has_expansion(w):
            argv.append(w.word)
            expanded.append(False)
            continue
        m = re.fullmatch(r'(")?\$([A-Za-z_][A-Za-z0-9_]*|[0-9])(?(1)")', raw)
        value = walk.vars.get(m.group(2)) if m else None
        if m and value is not None:
            # A variable set on the line to a literal: its value, split when unquoted.
            if m.group(1):
                items = [value]
            elif set(value) & set("*?["):
                raise _Unknown(f"{raw} expands to a pattern ({value})")
            else:
                items = value.split()
            argv += items
            expanded += [False] * len(items)
            continue
        if _may_be_option(raw, walk.vars):
            risky.append((len(argv), raw))
        argv.append(w.word)
        expanded.append(True)
    if risky and _program(walk, argv[0]) not in HARMLESS_OPTIONS:
        # After `--` a getopt program takes every word for an operand (find does not).
        dashdash = argv.index("--") if "--" in argv and argv[0] != "find" else len(argv)
        for at, raw in risky:
            if at < dashdash:
                raise _Unknown(f"{raw} may expand to an option or to several words (its "
                               "value is not known from the command line)")
    for part in assignments:
        # `o=-o eval ...`, `o=-o bash -c ...`: the command (and code it runs) sees the
        # new value; the words above were expanded with the old one. Not followed.
        walk.vars[part.word.split("=", 1)[0].rstrip("+")] = None
    walk.piped += _stdout_redirected([p for p in node.parts if p.kind == "redirect"])
    try:
        _argv(walk, argv, expanded)
    finally:
        walk.piped -= _stdout_redirected([p for p in node.parts if p.kind == "redirect"])


#: Programs none of whose options does harm: a variable there may hold one.
HARMLESS_OPTIONS = frozenset({"echo", "true", "false", ":", "test", "[", "cd", "sleep",
                              "basename", "dirname"})


def _stdout_redirected(redirects: list[Any]) -> bool:
    """Whether these redirections send standard output to a file (not a terminal)."""
    for r in redirects:
        out = getattr(r, "output", None)
        if getattr(r, "type", None) not in (">", ">>", ">|", "&>", "&>>", ">&") or \
                getattr(r, "input", None) not in (None, 1) or out is None or \
                isinstance(out, int) or _has_expansion(out):
            continue
        if out.word == "/dev/null" or not out.word.startswith(("/dev/", "/proc/")):
            return True
    return False


def _may_be_option(raw: str, known: dict[str, str | None]) -> bool:
    """Whether a word with expansions may become an option, or several words: an
    unquoted expansion of a variable not known (word splitting makes any words of it),
    or one in double quotes before any literal text (its value may start with ``-``)."""
    i, quoted, lead = 0, False, False
    while i < len(raw):
        c = raw[i]
        if c == "'" and not quoted:
            end = raw.find("'", i + 1)
            lead = lead or end > i + 1
            i = len(raw) if end < 0 else end + 1
            continue
        if c == '"':
            quoted = not quoted
            i += 1
            continue
        if c == "\\":
            lead = True
            i += 2
            continue
        if c == "$" and i + 1 < len(raw):
            m = re.match(r"[A-Za-z_][A-Za-z0-9_]*|[0-9@*#?$!-]", raw[i + 1:])
            if m is None:
                lead = True
                i += 1
                continue
            name = m.group(0)
            i += 1 + len(name)
            if name in "#?$!-":
                # Digits, or the shell's flags (no dash). Not $0: in `sh -c BODY ARG0` it
                # is ARG0, chosen by the line (known only when given literally).
                lead = True
                continue
            value = known.get(name)
            if value is None:
                if not quoted or not lead:
                    return True
                continue
            if not quoted and (set(value) & set(" \t\n*?[")) or \
                    not lead and value.startswith("-"):
                return True
            lead = lead or bool(value)
            continue
        lead = True
        i += 1
    return False


def _braces(raw: str) -> bool:
    """Whether a word holds a brace expansion bash would make (``{a,b}``, ``{1..3}``)
    outside quotes."""
    i, quoted = 0, ""
    depth = 0
    for i, c in enumerate(raw):
        if quoted:
            if c == quoted:
                quoted = ""
            continue
        if c in "'\"":
            quoted = c
        elif c == "{" and (i == 0 or raw[i - 1] != "$"):
            depth += 1
        elif c == "}" and depth:
            depth -= 1
        elif depth and (c == "," or raw.startswith("..", i)):
            return True
    return False


MAX_BRACE_WORDS = 256


def _brace_expand(word: str) -> list[str]:
    """Bash's brace expansion of a plain word: comma lists and ``{a..b[..step]}``."""
    for i, c in enumerate(word):
        if c != "{":
            continue
        depth, commas, j = 0, [], i
        for j in range(i, len(word)):
            if word[j] == "{":
                depth += 1
            elif word[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            elif word[j] == "," and depth == 1:
                commas.append(j)
        if depth:
            continue
        inner, pre, post = word[i + 1:j], word[:i], word[j + 1:]
        if commas:
            cuts = [i, *commas, j]
            alts = [word[cuts[k] + 1:cuts[k + 1]] for k in range(len(cuts) - 1)]
        else:
            seq = _sequence(inner)
            if seq is None:
                continue
            alts = seq
        out: list[str] = []
        for alt in alts:
            out += _brace_expand(pre + alt + post)
            if len(out) > MAX_BRACE_WORDS:
                raise _Unknown(f"a brace expansion of over {MAX_BRACE_WORDS} words")
        return out
    return [word]


def _sequence(inner: str) -> list[str] | None:
    m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?|([A-Za-z])\.\.([A-Za-z])"
                     r"(?:\.\.(-?\d+))?", inner)
    if m is None:
        return None
    if m.group(1) is not None:
        a, b = int(m.group(1)), int(m.group(2))
        if re.match(r"-?0\d", m.group(1)) or re.match(r"-?0\d", m.group(2)):
            raise _Unknown(f"a zero-padded brace sequence ({{{inner}}})")
        step = abs(int(m.group(3) or 1)) or 1
    else:
        a, b = ord(m.group(4)), ord(m.group(5))
        step = abs(int(m.group(6) or 1)) or 1
    if abs(b - a) // step > MAX_BRACE_WORDS:
        raise _Unknown(f"a brace expansion of over {MAX_BRACE_WORDS} words")
    seq = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    return [str(v) if m.group(1) is not None else chr(v) for v in seq]


def _assignment(walk: _Walk, part: Any) -> None:
    name = part.word.split("=", 1)[0].rstrip("+")
    for sub in getattr(part, "parts", ()) or ():
        if sub.kind in ("commandsubstitution", "processsubstitution"):
            raise _Unknown("command substitution: its output becomes part of the command")
    _check_name(name)
    raw = walk.src[part.pos[0]:part.pos[1]] if walk.src else part.word
    _integer_value(walk, part.word.partition("=")[2] + raw.partition("=")[2])


def _integer_value(walk: _Walk, value: str) -> None:
    """A value assigned where ``declare -i`` may have made the variable an integer is
    evaluated as arithmetic: a name in it is a variable whose value is evaluated in turn,
    and a subscript there is expanded again (``b[\\$\\(cmd\\)]`` runs cmd)."""
    if walk.integer and re.search(r"[][$`\\A-Za-z_(]", value):
        raise _Unknown("a value assigned where declare -i may make it arithmetic (array "
                       "subscripts in it are expanded again and may run commands)")


def _subscript(name: str, how: str) -> None:
    """Bash evaluates the subscript of a name given to a builtin as arithmetic (``printf
    -v 'a[x]'``, ``read 'a[x]'``, ``declare 'a[x]=1'``, ``test -v 'a[x]'``): x's value
    is expanded again there, and may run a command."""
    if "[" in name:
        raise _Unknown(f"{how} with an array subscript ({name}): bash evaluates it as "
                       "arithmetic, which may run commands")


def _check_name(name: str) -> None:
    """Refuse setting a variable that may change what later commands run."""
    if name in DANGEROUS_VARS or name.startswith(("LD_", "BASH_FUNC_", "DYLD_")):
        raise _Unknown(f"setting {name} changes what the command runs")
    if name != name.lower() and name not in SAFE_VARS and not name.startswith("LC_"):
        raise _Unknown(f"setting the environment variable {name} (it may change what "
                       "programs run)")


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _redirect(walk: _Walk, r: Any) -> None:
    out = getattr(r, "output", None)
    heredoc = getattr(r, "heredoc", None)
    if heredoc is not None:
        return  # input to a program; an interpreter fed stdin is unknown by itself
    if out is None or isinstance(out, int):
        return  # fd duplication (2>&1)
    if out.kind == "word":
        _word_expansions(walk, out)
        target = out.word
        if target.startswith(("/dev/tcp/", "/dev/udp/")):
            walk.raise_to("forward", f"{target} opens a network connection")
        if r.type in ("<",):
            walk.path(target)
            return
        if target in ("/dev/null", "/dev/stdout", "/dev/stderr") or r.type in ("<<<",):
            return
        if _has_expansion(out):
            walk.paths.append("*")
        else:
            walk.path(target)
        walk.raise_to("write", f"writes to {target} (redirection {r.type})")


def _program(walk: _Walk, name: str) -> str:
    """A program's name as rules know it (its base name), or unknown."""
    if not name:
        raise _Unknown("an empty command name")
    if any(c in _GLOB for c in name):
        raise _Unknown(f"a pattern in command position ({name})")
    if "/" in name:
        if ".." in name.split("/"):
            # The host resolves `..` through symbolic links (`/tmp/l/../../usr/bin/ls`
            # may be a script under /tmp), which the text cannot.
            raise _Unknown(f"a program named through `..` ({name})")
        d, base = posixpath.split(posixpath.normpath(name))
        if d not in SYSTEM_DIRS:
            raise _Unknown(f"a program outside the system directories ({name})")
        return base
    return name


def _argv(walk: _Walk, argv: list[str], expanded: list[bool]) -> None:
    prog = _program(walk, argv[0])
    args, args_expanded = argv[1:], expanded[1:]
    walk.programs.append(prog) if prog not in walk.programs else None
    walk.commands.append(" ".join(argv))
    if prog in WRAPPERS:
        opts, k = _getopt(args, *WRAPPERS[prog], numbers=prog == "nice")
        rest = args[k:]
        given = [o for o, _ in opts]
        if prog in ELEVATING:
            if not rest or _given(given, ("-s", "--shell"), ("-i", "--login"),
                                  ("-e", "--edit")):
                walk.raise_to("shell", f"{prog} opens a shell or an editor")
                raise _Unknown(f"{prog} without a command runs an interactive shell")
            walk.raise_to("admin", f"runs as another user ({prog})")
            if _given(given, ("-D", "--chdir"), ("-E", "--preserve-env"),
                      ("-R", "--chroot"), ("-C", "--close-from")) or \
                    prog == "doas" and _given(given, ("-C", "")):
                raise _Unknown(f"{prog} options that change the directory, the root or "
                               "keep the environment are not analysed")
        else:
            # An option's value may name a file (xargs -a FILE, time -o FILE).
            for _, v in opts:
                if v is not None:
                    walk.path(v)
            if any(args_expanded[:k]):
                walk.any_path()
        if prog == "env":
            if any(o not in ("-i", "-u", "-0") and not _given(
                    [o], ("", "--ignore-environment"), ("", "--unset"), ("", "--null"))
                    for o in given):
                raise _Unknown("env options that split strings, change directory or "
                               "signals are not analysed")
            while rest and rest[0] == "-":
                rest = rest[1:]  # `env -` is env -i
        if prog == "flock":
            # flock [options] FILE -c BODY | flock [options] FILE COMMAND...
            if len(rest) >= 2 and rest[1] in ("-c", "--command"):
                if len(rest) < 3 or args_expanded[k + 2]:
                    raise _Unknown("flock -c with a body keyturn cannot see")
                walk.path(rest[0])
                _nested(walk, rest[2], "flock -c", params={})
                return
            if rest:
                walk.path(rest[0])  # the lock file or descriptor
            rest = rest[1:]
        if prog == "time" and _given(given, ("-o", "--output")):
            walk.raise_to("write", "time -o writes a file")
        if prog == "ionice" and _given(given, ("-p", "--pid"), ("-P", "--pgid"),
                                       ("-u", "--uid")):
            # Its operands are process ids: it changes running processes.
            walk.raise_to("admin", "ionice -p/-P/-u changes the I/O class of running "
                          "processes")
            return
        while rest and "=" in rest[0] and prog == "env":
            _check_name(rest[0].split("=", 1)[0])
            rest = rest[1:]
        if prog in ("timeout",) and rest:
            rest = rest[1:]  # the duration
        if prog in ("chrt", "taskset") and rest:
            raise _Unknown(f"{prog}'s arguments are not analysed")
        if not rest:
            if prog == "xargs":
                walk.raise_to("read", "xargs echo")
            return
        n = len(argv) - len(rest)
        rest_expanded = list(expanded[n:])
        if prog == "xargs":
            walk.raise_to("read", "xargs runs its command with input as arguments")
            # Its input becomes arguments: paths unknown.
            walk.any_path()
            replace = _xargs_replace(opts)
            if replace is None:
                # Input words are appended: any of them may be an option.
                base = _program(walk, rest[0])
                if base not in HARMLESS_OPTIONS and "--" not in rest[1:] and \
                        base not in SHELLS:
                    raise _Unknown(f"xargs appends its input to {base}'s arguments: a "
                                   "word of it may be an option")
            else:
                # -I R / -i / --replace: R inside any argument (not the program name)
                # becomes an input line, inside an sh -c body too.
                for j in range(1, len(rest)):
                    if replace in rest[j]:
                        rest_expanded[j] = True
                dashdash = rest.index("--", 1) if "--" in rest[1:] else len(rest)
                if any(rest_expanded[1:dashdash]) and \
                        _program(walk, rest[0]) not in HARMLESS_OPTIONS:
                    raise _Unknown(f"xargs puts its input where {replace} is: an input "
                                   "line may be an option or shell code")
        # What a wrapper runs is a program of its own: a cd there moves no shell.
        before = walk.cwds
        try:
            _argv(walk, rest, rest_expanded)
        finally:
            walk.cwds, walk.cd_to = before, None
        return
    if prog == "su":
        opts, _k = _getopt(args, "cgGsw", "", ("--command", "--session-command", "--group",
                                               "--supp-group", "--shell",
                                               "--whitelist-environment"), (),
                           permute=True)
        given = [o for o, _ in opts]
        if _given(given, ("-s", "--shell"), ("-p", "--preserve-environment"), ("-m", ""),
                  ("-w", "--whitelist-environment"), ("-P", "--pty")):
            raise _Unknown("su with a shell or the caller's environment is not analysed")
        bodies = [v for o, v in opts if _given([o], ("-c", "--command"),
                                                ("", "--session-command"))]
        if not bodies or bodies[-1] is None:
            raise _Unknown("su without -c runs an interactive shell")
        walk.raise_to("admin", "runs as another user (su)")
        if _expanded_at(args, args_expanded, bodies[-1]):
            raise _Unknown("su -c with a body built from variables or input")
        _nested(walk, bodies[-1], "su -c", params={})
        return
    if prog in SHELLS:
        body, params = _shell_body(prog, args, args_expanded)
        _nested(walk, body, f"{prog} -c", params=params)
        return
    if prog in INTERPRETERS:
        raise _Unknown(f"{prog} runs code keyturn cannot see into")
    if prog in ASSIGNING:
        _assigning(walk, prog, args)
        return
    if prog == "printf":
        i = 0
        while i < len(args) and args[i].startswith("-v"):
            name = args[i][2:] or (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if args[i][2:] else 2
            _set_by_builtin(walk, name, "printf -v")
    if prog == "wait":
        for i, a in enumerate(args):
            if a.startswith("-") and "p" in a[1:]:
                _set_by_builtin(walk, args[i + 1] if i + 1 < len(args) else "", "wait -p")
    if prog in ("test", "[") and "-v" in args:
        for a in args:
            _subscript(a, f"{prog} -v")
    if prog in UNSEEABLE_BUILTINS:
        if prog == "eval" and args and not any(args_expanded):
            _nested(walk, " ".join(args), "eval", params=None)
            return
        if prog == "exec" and not args:
            return  # redirections only
        if prog == "exec" or prog == "command" or prog == "builtin":
            if prog == "command" and any(a in ("-v", "-V") for a in args):
                return
            i = 0
            while i < len(args) and args[i].startswith("-") and args[i] != "--":
                i += 2 if args[i] == "-a" else 1  # exec -a NAME: argv[0] only
            if i < len(args) and args[i] == "--":
                i += 1
            if i < len(args):
                before = walk.cwds
                _argv(walk, args[i:], args_expanded[i:])
                if prog == "exec":
                    walk.cwds, walk.cd_to = before, None  # a program, not the builtin cd
            return
        raise _Unknown(f"the builtin {prog} changes how later commands run")
    if prog == "cd":
        # cd may fail (no such directory, not one, no permission): the shell then stays
        # where it was. Both are recorded; only what follows `&&` knows it succeeded.
        target = next((a for a in args if not a.startswith("-")), "~")
        if any(args_expanded) or "-" in args or target.startswith("~") and target != "~" \
                and not target.startswith("~/"):
            to: tuple[str, ...] = ("*",)
        else:
            to = _union(_resolve(target, c) for c in walk.cwds)
        walk.cd_to = to
        walk.cwds = _union(walk.cwds, to)
        return
    if prog == "find":
        _find(walk, args, args_expanded)
        return
    if prog == "tar" and args and not args[0].startswith("-"):
        # Old-style options: the first word is a bundle of option letters whose values
        # are the next words (`tar tIf PROG ARCHIVE` is `tar -t -I PROG -f ARCHIVE`).
        args = ["-" + args[0], *args[1:]]
    valued = VALUED_SHORT.get(prog, "")
    for opt in EXEC_OPTIONS.get(prog, ()):
        if any(a == opt or _long(a, opt)
               or (len(opt) == 2 and opt[1] in _bundle(a, valued)) for a in args):
            raise _Unknown(f"{prog} {opt} may run a command of the caller's choosing")
    cls, why = _program_class(prog, args)
    walk.raise_to(cls, why)
    if cls == "read" and walk.terminal and not walk.piped and prog in PAGING and not any(
            _long(a, "--no-pager") or _long(a, "--nopager") for a in args) and (
            prog != "dmesg" or any("H" in _bundle(a, valued) or _long(a, "--human")
                                   for a in args)):
        raise _Unknown(f"with a terminal, {prog} shows its output in a pager (less), "
                       "which runs shell commands typed in it (add --no-pager, or pipe "
                       "its output)")
    script = _sed(args)[1] if prog == "sed" else None
    under = _recursive(prog, args)
    if under and not _has_operand(prog, args):
        walk.path(".", under=True)  # grep -r PATTERN, rg, du, ls -R: the working directory
    for i, (a, e) in enumerate(zip(args, args_expanded, strict=False)):
        if a == "{}" or i == script:
            continue  # find -exec's placeholder (find's own paths stand for it); sed's script
        if e:
            walk.any_path()  # a variable may name any file
        elif a.startswith("--"):
            # --name=VALUE: the value may be a file (--from-file=F, --target-directory=D).
            value = a.partition("=")[2]
            if value:
                walk.path(value, under)
        elif a.startswith("-") and len(a) > 2 and not a[1:].isdigit():
            # An attached short-option value (-f/etc/x, -tDIR) may be a file: every tail of
            # the bundle after its option letters.
            for j in range(2, len(a)):
                if not a[1:j].isalnum():
                    break
                walk.path(a[j:], under)
        elif a and not a.startswith("-"):
            # Any operand may be a file name (relative to the tracked directory); below
            # it too for a recursive program (grep -r X /etc reads /etc/passwd).
            walk.path(a, under)


#: Programs that always reach everything below a directory operand.
ALWAYS_RECURSIVE = frozenset({"rg", "ag", "du", "tar", "mv", "rsync", "unzip", "zip",
                              "scp"})
#: Programs that do with an option: (option letters, long options, short options that
#: take a value).
RECURSIVE_WITH = {
    "grep": ("rRd", ("--recursive", "--dereference-recursive", "--directories"),
             "efmABCDd"),
    "diff": ("r", ("--recursive",), "CDFILSUWxX"),
    "ls": ("R", ("--recursive",), "ITw"),
    "cp": ("rRa", ("--recursive", "--archive"), "St"),
    "chmod": ("R", ("--recursive",), ""), "chown": ("R", ("--recursive",), ""),
    "chgrp": ("R", ("--recursive",), ""), "chattr": ("R", (), "pv"),
    "setfacl": ("R", ("--recursive",), "mMxX"), "rm": ("rR", ("--recursive",), ""),
    "gzip": ("r", ("--recursive",), "S"), "gunzip": ("r", ("--recursive",), "S"),
}
for _g in ("egrep", "fgrep", "zgrep"):
    RECURSIVE_WITH[_g] = RECURSIVE_WITH["grep"]


def _recursive(prog: str, args: list[str]) -> bool:
    """Whether ``prog`` reaches what is below its operands (the riskiest reading of
    option bundles: ``-d``'s value is not looked at, any ``-d`` counts)."""
    if prog in ALWAYS_RECURSIVE:
        return True
    letters, longs, valued = RECURSIVE_WITH.get(prog, ("", (), ""))
    return any(set(_bundle(a, valued)) & set(letters) or any(_long(a, o) for o in longs)
               for a in args if letters or longs)


def _has_operand(prog: str, args: list[str]) -> bool:
    """Whether a recursive program is given a path to start from (grep's first operand is
    its pattern unless -e/-f gives one)."""
    operands = [a for a in args if not a.startswith("-")]
    if prog in ("grep", "egrep", "fgrep", "zgrep", "rg", "ag") and not any(
            set(_bundle(a, "efmABCDd")) & set("ef") or _long(a, "--regexp") or
            _long(a, "--file") for a in args):
        operands = operands[1:]
    return bool(operands)


def _program_class(prog: str, args: list[str]) -> tuple[str, str]:
    if prog in READ_SUBCOMMANDS:
        sub = next((a for a in args if not a.startswith("-")), None) \
            if prog not in ("dpkg", "crontab", "service") else next(iter(args), None)
        if prog == "ip":
            words = [a for a in args if not a.startswith("-")]
            if words and words[0] == "netns":
                raise _Unknown("ip netns may run a command in another namespace")
            # Read only as `ip [options] OBJECT [show|list]` (ip takes any abbreviation of
            # its verbs, so anything else may change something).
            if words and words[0] in READ_SUBCOMMANDS["ip"] and (
                    len(words) == 1 or words[1] in ("show", "list", "ls", "sh", "s")):
                return "read", f"{prog} {words[0]} only reads"
            return "admin", f"{prog} changes network settings"
        if prog in ("docker", "podman", "kubectl") and args and args[0].startswith("-"):
            return "admin", f"{prog} with global options (they may take the subcommand's " \
                            "place) is judged as changing things"
        if sub is not None and sub in READ_SUBCOMMANDS[prog]:
            return "read", f"{prog} {sub} only reads"
        if sub is None and prog == "git" and all(a in ("--version", "--help", "-h")
                                                 for a in args):
            return "read", "git --version only reads"
        if prog == "service" and len(args) >= 2 and args[1] == "status":
            return "read", "service status only reads"
        if prog == "git":
            if sub in GIT_WRITES:
                return "write", f"git {sub} changes the repository"
            # An alias (`!cmd` runs a shell command) or a git-<name> program on PATH.
            raise _Unknown(f"git {sub or ''} is not a git command keyturn knows (an alias "
                           "or an external command may run anything)")
        if prog == "ip" or prog in ("apt", "dpkg", "crontab"):
            return "admin", f"{prog} changes the system"
        if sub is None and prog in ("systemctl", "loginctl", "timedatectl", "hostnamectl"):
            return "read", f"{prog} without a command shows the status"
        if sub is not None:
            # Only the subcommands listed read; any other (or a word taken for one) may
            # change something.
            return "admin", f"{prog} {sub} changes the system"
    if prog == "sed":
        if _given(_sed(args)[0], ("-i", "--in-place")):
            return "write", "sed -i edits files in place"
        return "read", "sed without -i only prints"
    if prog == "sort" and any(_long(a, "--output") or _long(a, "--compress-program") or
                              "o" in _bundle(a, VALUED_SHORT["sort"]) for a in args):
        return "write", "sort -o writes a file"
    if prog == "uniq" and len([a for a in args if not a.startswith("-")]) >= 2:
        return "write", "uniq INPUT OUTPUT writes a file"
    if prog == "xxd":
        xxd_operands, i = [], 0
        while i < len(args):
            a = args[i]
            if a.startswith("-") and len(a) > 1:
                if a[1] in "cglnosR" and (len(a) == 2 or a[2:].isalpha()):
                    i += 1  # its value is the next word
                elif "r" in a[1:2]:
                    return "write", "xxd -r writes a file"
            else:
                xxd_operands.append(a)
            i += 1
        if len(xxd_operands) >= 2:
            return "write", "xxd INPUT OUTPUT writes OUTPUT"
    if prog == "yq" and any(_long(a, "--in-place") or _long(a, "--inplace") or
                            _long(a, "--split-exp") or set(_bundle(a)) & set("is")
                            for a in args):
        return "write", "yq -i edits files in place (yq -s writes files)"
    if prog in ("top", "htop", "atop"):
        if prog == "top" and any("b" in _bundle(a, "dnoOpsuUw") for a in args):
            return "read", "top -b only prints"
        return "admin", f"{prog} takes commands that kill and renice processes"
    if prog == "ss":
        if any("K" in _bundle(a, "fADFN") or _long(a, "--kill") for a in args):
            return "admin", "ss -K closes sockets"
        if any("D" in _bundle(a, "fADFN") or _long(a, "--diag") for a in args):
            return "write", "ss -D writes a file"
    if prog == "sar" and any("o" in _bundle(a) for a in args):
        return "write", "sar -o writes a file"
    if prog == "ifconfig" and len([a for a in args if not a.startswith("-")]) >= 2:
        return "admin", "ifconfig INTERFACE ... changes network settings"
    if prog == "lastlog" and any(set(_bundle(a, "btu")) & set("CS") or _long(a, "--clear")
                                 or _long(a, "--set") for a in args):
        return "admin", "lastlog -C/-S changes the login records"
    if prog == "file" and any("C" in _bundle(a, "efFmP") or _long(a, "--compile")
                              for a in args):
        return "write", "file -C writes a magic file"
    if prog == "ldd":
        raise _Unknown("ldd may run the program it is given")
    if prog == "dmesg" and any(set(_bundle(a, "Fflns")) & set("CcDEn") or
                               _long(a, "--clear") or
                               _long(a, "--read-clear") or _long(a, "--console-off") or
                               _long(a, "--console-on") or _long(a, "--console-level")
                               for a in args):
        return "admin", "dmesg clears the ring buffer or changes the console"
    if prog == "date":
        operands: list[str] = []
        opts, _k = _getopt(args, "dfrs", "I", ("--date", "--file", "--reference", "--set",
                                               "--rfc-3339"), ("--iso-8601",),
                           operands=operands)
        if _given([o for o, _ in opts], ("-s", "--set")):
            return "admin", "date --set changes the clock"
        if any(not a.startswith("+") for a in operands):
            return "admin", "date MMDDhhmm sets the clock"
    if prog == "hostname" and any(set(_bundle(a, "F")) & set("Fb") or _long(a, "--file") or
                                  _long(a, "--boot") for a in args):
        return "admin", "hostname -F renames the host"
    if prog == "rsync":
        if any(_long(a, "--delete") or _long(a, "--remove-source-files") or
               a.startswith("--del") for a in args):
            return "destructive", "rsync --delete removes files"
        if any(a.startswith("-") and not a.startswith("--") and "e" in a for a in args):
            raise _Unknown("rsync -e runs a command of the caller's choosing")
    if prog == "tar":
        valued = VALUED_SHORT["tar"]
        for i, a in enumerate(args):
            bundle = _bundle(a, valued)
            if "M" in bundle or _long(a, "--multi-volume"):
                raise _Unknown("tar -M prompts for volumes, and its prompt runs a shell")
            value = None
            if bundle.endswith("f"):
                value = a[len(bundle) + 1:] or (args[i + 1] if i + 1 < len(args) else "")
            elif _long(a, "--file"):
                value = a.partition("=")[2] or (args[i + 1] if "=" not in a and
                                                i + 1 < len(args) else "")
            if value and ":" in value and not any(_long(b, "--force-local") for b in args):
                raise _Unknown("tar -f HOST:FILE runs a remote shell (rsh) to reach it")
        if any(_long(a, "--remove-files") for a in args):
            return "destructive", "tar --remove-files removes what it archives"
        if any("g" in _bundle(a, valued) or _long(a, "--listed-incremental") or
               _long(a, "--index-file") or _long(a, "--volno-file") for a in args):
            return "write", "tar -g/--index-file/--volno-file write a file (in list mode " \
                            "too)"
        if any("t" in _bundle(a, valued) or _long(a, "--list") for a in args):
            return "read", "tar -t only lists"
        return "write", "tar creates or extracts files"
    if prog == "hostname" and any(not a.startswith("-") for a in args):
        return "admin", "hostname NAME renames the host"
    if prog == "kill" and args and all(a in ("-l", "-L", "-0") or a.isdigit() and
                                       args[0] == "-0" for a in args):
        return "read", "kill -l/-0 only looks"
    if prog in ("curl", "wget"):
        return "write", f"{prog} reaches the network and may write files"
    if prog == "dd" or prog in DESTRUCTIVE:
        return "destructive", f"{prog} removes or overwrites data"
    if prog.startswith("mkfs"):
        return "destructive", f"{prog} makes a file system (erases a device)"
    if prog in ADMIN:
        return "admin", f"{prog} changes services, processes, packages or permissions"
    if prog in WRITE:
        return "write", f"{prog} creates or changes files"
    if prog in READ:
        return "read", f"{prog} only reads"
    raise _Unknown(f"{prog} is not a program keyturn knows")


#: Builtins that only set shell variables (whose names are checked like assignments).
ASSIGNING = frozenset({"read", "export", "local", "declare", "typeset", "readonly"})
_SED_ADDR = r"(?:\d+|\$|/(?:[^/\\]|\\.)*/)(?:,(?:\d+|\$|/(?:[^/\\]|\\.)*/))?!?"
_SED_SUBST = r"s(?P<d>[^\\\n\w\s])(?:(?!(?P=d))[^\\]|\\.)*(?P=d)" \
             r"(?:(?!(?P=d))[^\\]|\\.)*(?P=d)[gpiImM0-9]*"
_SED_CMD = re.compile(rf"\s*(?:{_SED_ADDR})?\s*(?:{_SED_SUBST}|[pdqQ=lnNgGhHxDP]|"
                      r"y/(?:[^/\\]|\\.)*/(?:[^/\\]|\\.)*/|\{|\})?\s*")


def _sed(args: list[str]) -> tuple[list[str], int | None]:
    """sed scripts may run commands (``e``, ``s///e``) or write files (``w``): only
    scripts of plain commands are analysed (anything else is unknown). Returns the options
    given and the index of the script operand (None with -e)."""
    opts, first = _getopt(args, "efl", "i", ("--expression", "--file", "--line-length"),
                          ("--in-place",), permute=True)
    given = [o for o, _ in opts]
    if _given(given, ("-f", "--file")):
        raise _Unknown("sed -f runs a script file keyturn cannot see")
    scripts = [v or "" for o, v in opts if _given([o], ("-e", "--expression"))]
    script_at: int | None = None
    if not scripts and first < len(args):
        script_at = first
        scripts = [args[first]]
    for script in scripts:
        for part in re.split(r"[;\n]", script) if "s" not in script else [script]:
            pos = 0
            while pos < len(part):
                m = _SED_CMD.match(part, pos)
                if m is None or m.end() == pos:
                    raise _Unknown("a sed script keyturn does not analyse (it may run "
                                   "commands or write files)")
                pos = m.end()
                if pos < len(part) and part[pos] == ";":
                    pos += 1
    return given, script_at


def _assigning(walk: _Walk, prog: str, args: list[str]) -> None:
    if prog in ("declare", "typeset", "export", "local", "readonly") and any(
            a.startswith("-") and a not in ("-r", "-x", "-i", "-a", "-A", "-l", "-u")
            for a in args):
        raise _Unknown(f"{prog} with options keyturn does not analyse")
    if prog != "read" and any(a.startswith(("-", "+")) and "i" in a for a in args):
        walk.integer = True
    for a in args:
        if a.startswith("-"):
            continue
        name, eq, value = a.partition("=")
        _subscript(name, prog)
        if prog == "read" or eq:
            # read x (a line of input), declare x=...: not followed from here on.
            if prog == "read" and walk.integer:
                raise _Unknown("read sets a variable declare -i may have made an integer "
                               "(its input is evaluated as arithmetic)")
            _integer_value(walk, value)
        if _NAME.match(name):
            _check_name(name)
            walk.vars[name] = None


def _set_by_builtin(walk: _Walk, name: str, how: str) -> None:
    """A builtin sets the variable ``name`` (printf -v, read, wait -p...): its value is
    not followed from here on."""
    _subscript(name, how)
    if walk.integer:
        raise _Unknown(f"{how} sets a variable declare -i may have made an integer (its "
                       "value is evaluated as arithmetic)")
    if _NAME.match(name):
        _check_name(name)
    walk.vars[name] = None


def _xargs_replace(opts: list[tuple[str, str | None]]) -> str | None:
    """The replace string of xargs -I R / -i[R] / --replace[=R] (None without)."""
    replace: str | None = None
    for o, v in opts:
        if o == "-I":
            replace = v if v is not None else ""
        elif o == "-i" or _long(o, "--replace"):
            replace = v or "{}"
    if replace == "":
        raise _Unknown("xargs -I without a replace string")
    return replace


#: set -o options a nested shell may be given (the others change how it runs).
SHELL_SET_OPTIONS = frozenset({"errexit", "nounset", "pipefail", "xtrace", "verbose",
                               "noglob", "noclobber", "allexport", "posix", "errtrace",
                               "functrace", "hashall", "braceexpand", "noexec", "notify"})


def _shell_body(prog: str, args: list[str], expanded: list[bool]
                ) -> tuple[str, dict[str, str | None]]:
    """A POSIX shell's invocation read like the shell reads it: options end at the first
    word that is not one (or ``-``/``--``); with ``-c`` that word is the body and the
    words after it are $0, $1...; without, it is a script file (``bash /dev/stdin -c
    ls`` runs stdin with ``-c ls`` as its arguments). Returns the body and the positional
    parameters given literally."""
    if prog not in ("sh", "bash", "dash", "ash"):
        raise _Unknown(f"{prog} is not a shell whose syntax keyturn analyses")
    command = False
    i = 0
    while i < len(args):
        a = args[i]
        if expanded[i]:
            raise _Unknown(f"{prog} with an option or operand from a variable or input")
        if a in ("-", "--"):
            i += 1
            break
        if a.startswith("--"):
            if prog == "bash" and a in ("--norc", "--noprofile", "--posix", "--noediting",
                                        "--restricted", "--verbose", "--version",
                                        "--help"):
                i += 1
                continue
            raise _Unknown(f"{prog} {a} (start-up files, a debugger or an option keyturn "
                           "does not analyse)")
        if a[:1] not in ("-", "+") or len(a) < 2:
            break
        for ch in a[1:]:
            if ch == "c" and a[0] == "-":
                command = True
            elif ch in "oO":
                i += 1
                value = args[i] if i < len(args) else None
                if ch == "O" or value not in SHELL_SET_OPTIONS or expanded[i]:
                    raise _Unknown(f"{prog} {a[0]}{ch} {value} changes how it runs")
            elif ch in "il":
                raise _Unknown(f"{prog} as an interactive or login shell runs its "
                               "start-up files")
            elif ch not in "aBbCEefHhmnPpTtuvxr":
                raise _Unknown(f"{prog} {a[0]}{ch} (reads its input, or an option keyturn "
                               "does not analyse)")
        i += 1
    if not command:
        raise _Unknown(f"{prog} runs a script or its input, which keyturn cannot see")
    if i >= len(args):
        raise _Unknown(f"{prog} -c without a body")
    if expanded[i]:
        raise _Unknown(f"{prog} -c with a body built from variables or input")
    # $0, $1... are the words after the body; any not given here may still come from
    # elsewhere (xargs appends its input), so only literal ones are known.
    params: dict[str, str | None] = {}
    for n in range(min(len(args) - i - 1, 10)):
        if not expanded[i + 1 + n]:
            params[str(n)] = args[i + 1 + n]
    return args[i], params


def _long(arg: str, option: str) -> bool:
    """Whether ``arg`` is the long option ``option`` as GNU getopt_long reads it: in full
    or any prefix of it (``--in`` is ``--in-place``, ``--o=F`` is ``--output=F``), with or
    without a ``=value``. An abbreviation that fits several options counts as each of them
    (the riskiest reading; the program itself refuses an ambiguous one)."""
    if not arg.startswith("--") or not option.startswith("--"):
        return False
    name = arg.split("=", 1)[0]
    return len(name) >= 3 and option.startswith(name)


def _given(opts: Iterable[str], *pairs: tuple[str, str]) -> bool:
    """Whether any of ``opts`` (as _getopt gives them) is one of the (short, long) pairs."""
    return any(o == short or (long and _long(o, long))
               for o in opts for short, long in pairs if o)


def _getopt(args: list[str], short: str, short_optional: str, long: Iterable[str],
            long_optional: Iterable[str], *, numbers: bool = False, permute: bool = False,
            operands: list[str] | None = None) -> tuple[list[tuple[str, str | None]], int]:
    """A program's options as getopt_long reads them: (option, value) pairs and the index of
    the first operand. A bundle of short options is read letter by letter; the first letter
    that takes a value takes the rest of the bundle, or the next word. A long option is any
    prefix of its name; a prefix of one that takes a value takes one (``--arg FILE``).
    Reading stops at ``--`` or the first operand (``permute``, or ``operands`` to collect
    them: operands are skipped, as getopt does without a leading ``+``)."""
    permute = permute or operands is not None
    opts: list[tuple[str, str | None]] = []
    long, long_optional = tuple(long), tuple(long_optional)
    first: int | None = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            if operands is not None:
                operands.extend(args[i + 1:])
            return opts, (i + 1 if first is None else first)
        if not a.startswith("-") or a == "-":
            if not permute:
                return opts, i
            first = i if first is None else first
            if operands is not None:
                operands.append(a)
            i += 1
            continue
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            if eq:
                opts.append((name, value))
            elif any(_long(name, o) for o in long):
                opts.append((name, args[i + 1] if i + 1 < len(args) else None))
                i += 1
            else:
                opts.append((name, None))
            i += 1
            continue
        if numbers and a[1:].isdigit():
            opts.append((a, None))
            i += 1
            continue
        for j in range(1, len(a)):
            letter = "-" + a[j]
            if a[j] in short:
                if j + 1 < len(a):
                    opts.append((letter, a[j + 1:]))
                else:
                    opts.append((letter, args[i + 1] if i + 1 < len(args) else None))
                    i += 1
                break
            if a[j] in short_optional:
                opts.append((letter, a[j + 1:] or None))
                break
            opts.append((letter, None))
        i += 1
    return opts, (len(args) if first is None else first)


def _bundle(arg: str, valued: str = "") -> str:
    """The option letters of a short-option bundle (``-tIf`` -> ``tIf``), up to and with
    the first that takes a value (the rest is its value); empty for anything else. With
    ``valued`` unknown every character counts (the riskiest reading)."""
    if not arg.startswith("-") or arg.startswith("--") or len(arg) < 2:
        return ""
    for j in range(1, len(arg)):
        if arg[j] in valued:
            return arg[1:j + 1]
    return arg[1:]


def _find(walk: _Walk, args: list[str], expanded: list[bool]) -> None:
    walk.raise_to("read", "find only reads")
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-exec", "-execdir", "-ok", "-okdir"):
            j = i + 1
            while j < len(args) and args[j] not in (";", "+"):
                j += 1
            inner = args[i + 1:j]
            if not inner:
                raise _Unknown("find -exec without a command")
            # find puts each file name where {} is, inside any argument (an sh -c
            # body too): those arguments are anyone's to choose.
            inner_expanded = [e or k > 0 and "{}" in a for k, (a, e) in enumerate(
                zip(inner, expanded[i + 1:j], strict=False))]
            before = walk.cwds
            try:
                _argv(walk, inner, inner_expanded)
            finally:
                walk.cwds, walk.cd_to = before, None
            if "*" not in walk.paths:
                walk.paths.append("*")  # it runs on whatever find finds
            i = j + 1
            continue
        if a == "-delete":
            walk.raise_to("destructive", "find -delete removes what it finds")
            if "*" not in walk.paths:
                walk.paths.append("*")
        elif a in ("-fprint", "-fprint0", "-fprintf", "-fls"):
            walk.raise_to("write", f"find {a} writes a file")
            if i + 1 < len(args):
                walk.path(args[i + 1])
        elif not a.startswith("-") and (i == 0 or not args[i - 1].startswith("-")):
            if expanded[i]:
                walk.paths.append("*") if "*" not in walk.paths else None
            elif _looks_like_path(a) or a == ".":
                walk.path(a, under=True)  # everything below a starting point
        i += 1
    if not args or args[0].startswith(("-", "(", "!")):
        walk.path(".", under=True)  # no starting point: the working directory


def _option_value(args: list[str], flags: Iterable[str]) -> str | None:
    """The value given to the first of ``flags`` (``-c BODY``, ``-cBODY`` or a combined
    ``-lc BODY``)."""
    for i, a in enumerate(args):
        for f in flags:
            if a == f or (f == "-c" and a.startswith("-") and not a.startswith("--")
                          and "c" in a[1:] and a[1:].isalpha()):
                return args[i + 1] if i + 1 < len(args) else None
            if f.startswith("--") and a.startswith(f + "="):
                return a.split("=", 1)[1]
    return None


def _expanded_at(args: list[str], expanded: list[bool], value: str) -> bool:
    return any(e for a, e in zip(args, expanded, strict=False) if a == value)


def _nested(walk: _Walk, body: str, how: str,
            params: dict[str, str | None] | None) -> None:
    """Walk a body of shell code. ``params`` None: it runs in this shell (eval), whose
    directory and variables it changes; otherwise in a shell of its own, which sees
    none of the line's variables (only ``params``, its $0, $1... given literally) and
    changes nothing here."""
    walk.raise_to("read", f"{how} body analysed")
    walk.depth += 1
    saved_cwds, saved_vars = walk.cwds, walk.vars
    if params is not None:
        walk.vars = dict(params)
    try:
        _parse_into(walk, body)
    finally:
        walk.depth -= 1
        walk.cd_to = None
        if params is not None:
            walk.cwds, walk.vars = saved_cwds, saved_vars


def _looks_like_path(arg: str) -> bool:
    return not arg.startswith("-") and ("/" in arg or arg.startswith(("~", ".")))


def _resolve(word: str, cwd: str | None) -> str:
    """A path as written, made absolute against the tracked working directory where it
    can be (``~`` is the login user's home). ``*`` (anywhere) when it cannot be: after
    ``cd $X``, another user's home, and any ``..`` (the host resolves it through
    symbolic links, which text cannot). Brace groups become ``*`` patterns."""
    word = re.sub(r"\{[^{}]*\}", "*", word)
    parts = word.split("/")
    if ".." in parts:
        return "*"
    if word.startswith("/"):
        p = "/" + posixpath.normpath(word).lstrip("/")
        return "*" if magic_link(p) else p
    if word == "~" or word.startswith("~/"):
        return posixpath.normpath(word)
    if word.startswith("~") or cwd is None or cwd == "*":
        return "*"
    if ".." in cwd.split("/"):
        return "*"
    p = posixpath.normpath(posixpath.join(cwd, word))
    return "*" if magic_link(p) else p


#: /proc and /dev links that lead anywhere: a process's root and working directory, its
#: open files (and each thread's); ``*`` stands for any one name.
_MAGIC = (("proc", "*", ("root", "cwd", "fd", "map_files")),
          ("proc", "*", "task", "*", ("root", "cwd", "fd", "map_files")),
          ("dev", "fd"))


def magic_link(path: str) -> bool:
    """Whether an absolute, normalised path goes through a /proc magic link
    (``/proc/self/root/etc/passwd`` is /etc/passwd; ``/proc/<pid>/cwd``, ``/proc/*/fd/N``,
    ``/proc/thread-self/...``, ``/dev/fd/N``): it may name any file. Components with glob
    characters match what they could match."""
    parts = path.split("/")[1:]
    for shape in _MAGIC:
        if len(parts) < len(shape):
            continue
        for part, want in zip(parts, shape, strict=False):
            names = (want,) if isinstance(want, str) else want
            if want == "*" or part in names:
                continue
            if set(part) & _GLOB and any(fnmatch.fnmatchcase(n, part) for n in names):
                continue
            break
        else:
            return True
    return False


__all__ = ["CLASSES", "ShellAction", "classify", "magic_link"]
