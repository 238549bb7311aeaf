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
directories (``./ls``, ``/tmp/ls``), an interpreter given a script or stdin (``sh``,
``python -c``, ``perl -e``, ``base64 -d | sh``), ``eval``/``source`` of anything that is not
a literal, a variable that changes how commands are found or run (``PATH=``,
``LD_PRELOAD=``, ``BASH_ENV=``) — all are ``unknown``, the riskiest class.

This module is sans-I/O: it must not import asyncio, sockets or asyncssh, and must never
raise on any input (a hypothesis test feeds it arbitrary text).
"""

from __future__ import annotations

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
    "journalctl": frozenset(),
}
#: Options that make an otherwise known program run a command of the caller's choosing.
EXEC_OPTIONS: dict[str, tuple[str, ...]] = {
    "git": ("-c", "--exec-path", "--config-env", "-C"),
    "rsync": ("-e", "--rsh", "--rsync-path"),
    "tar": ("-I", "--use-compress-program", "--to-command", "--checkpoint-action",
            "-F", "--info-script", "--new-volume-script", "--rsh-command"),
    "sort": ("--compress-program",),
    "zip": ("-T", "-TT", "--unzip-command"),
    "scp": ("-S", "-o", "-F"),
    "curl": ("-K", "--config"),
    "less": ("-k", "--lesskey-file"),
    "journalctl": ("--vacuum-size", "--vacuum-time", "--vacuum-files", "--rotate",
                   "--flush", "--relinquish-var", "--setup-keys"),
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
#: Wrappers that run the rest of their arguments as a command: options they take that
#: consume a value.
WRAPPERS: dict[str, frozenset[str]] = {
    "sudo": frozenset({"-u", "-g", "-h", "-p", "-C", "-D", "-r", "-t", "-T", "-U",
                       "--user", "--group", "--host", "--prompt", "--chdir"}),
    "doas": frozenset({"-u", "-C"}),
    "env": frozenset({"-u", "--unset", "-C", "--chdir", "-S", "--split-string"}),
    "nice": frozenset({"-n", "--adjustment"}),
    "ionice": frozenset({"-c", "-n", "-p", "-P", "-u"}),
    "nohup": frozenset(),
    "setsid": frozenset(),
    "stdbuf": frozenset({"-i", "-o", "-e"}),
    "timeout": frozenset({"-k", "--kill-after", "-s", "--signal"}),
    "chrt": frozenset(),
    "taskset": frozenset(),
    "xargs": frozenset({"-a", "-d", "-E", "-I", "-L", "-n", "-P", "-s",
                        "--arg-file", "--delimiter", "--max-args", "--max-procs",
                        "--max-chars", "--replace", "--max-lines"}),
    "time": frozenset({"-f", "--format", "-o", "--output"}),
    "flock": frozenset({"-w", "--wait", "--timeout", "-E", "--conflict-exit-code",
                        "-c", "--command"}),
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
    cwd: str | None = "~"  # None: unknown after ``cd $X``
    depth: int = 0

    def raise_to(self, cls: str, why: str) -> None:
        if why not in self.reasons:
            self.reasons.append(why)
        if _RISK[cls] > _RISK[self.cls]:
            self.cls = cls

    def path(self, word: str) -> None:
        p = _resolve(word, self.cwd)
        if p not in self.paths:
            self.paths.append(p)


class _Unknown(Exception):
    """Stop: the command line holds something that cannot be seen into."""


MAX_DEPTH = 8  # nested sh -c / eval bodies before the line counts as unknown
MAX_TEXT = 64 * 1024


def classify(text: str) -> ShellAction:
    """The class, programs and paths of the command line ``text`` (never raises)."""
    walk = _Walk()
    if not text.strip():
        # An exec request with no command: SSH servers start the login shell for it.
        return ShellAction(text, "unknown", ("an empty command starts a shell on the host",),
                           ("*",), ("*",))
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
    for tree in trees:
        _node(walk, tree)


def _node(walk: _Walk, node: Any) -> None:
    kind = node.kind
    if kind == "command":
        _command(walk, node)
    elif kind in ("list", "pipeline", "compound"):
        for part in getattr(node, "parts", None) or getattr(node, "list", None) or ():
            _node(walk, part)
        for r in getattr(node, "redirects", ()) or ():
            _redirect(walk, r)
    elif kind in ("if", "for", "while", "until"):
        if kind == "for":
            names = [p for p in node.parts if p.kind == "word"]
            if names:
                _check_name(names[0].word)  # for PATH in /tmp; do ls; done
        for part in node.parts:
            if part.kind == "word":
                _word_expansions(walk, part)
            elif part.kind != "reservedword":
                _node(walk, part)
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
    for part in node.parts:
        if part.kind == "assignment":
            _assignment(walk, part)
        elif part.kind == "redirect":
            _redirect(walk, part)
        elif part.kind == "word":
            _word_expansions(walk, part)
            words.append(part)
        else:
            _node(walk, part)
    if not words:
        return
    argv = [w.word for w in words]
    if _has_expansion(words[0]):
        raise _Unknown("a variable or substitution in command position")
    expanded = [_has_expansion(w) for w in words]
    _argv(walk, argv, expanded)


def _assignment(walk: _Walk, part: Any) -> None:
    name = part.word.split("=", 1)[0].rstrip("+")
    for sub in getattr(part, "parts", ()) or ():
        if sub.kind in ("commandsubstitution", "processsubstitution"):
            raise _Unknown("command substitution: its output becomes part of the command")
    _check_name(name)


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
        rest = _after_options(args, WRAPPERS[prog], prog)
        if prog in ELEVATING:
            if not rest or any(a in ("-s", "-i", "--shell", "--login", "-e", "--edit")
                               for a in args[:len(args) - len(rest)]):
                walk.raise_to("shell", f"{prog} opens a shell or an editor")
                raise _Unknown(f"{prog} without a command runs an interactive shell")
            walk.raise_to("admin", f"runs as another user ({prog})")
            if any(a in ("-D", "--chdir", "-E", "--preserve-env") or
                   a.startswith(("--chdir=", "--preserve-env=")) for a in args):
                raise _Unknown(f"{prog} options that change the directory or keep the "
                               "environment are not analysed")
        if prog == "env" and any(a.startswith("-") and a not in (
                "-i", "-", "--ignore-environment", "-u", "--unset", "-0", "--null") and
                not a.startswith("--unset=") and "=" not in a for a in
                args[:len(args) - len(rest)]):
            raise _Unknown("env options that split strings or change directory are not "
                           "analysed")
        if prog == "flock":
            body = _option_value(args, ("-c", "--command"))
            if body is not None:
                _nested(walk, body, "flock -c")
                return
            rest = rest[1:]  # the lock file or descriptor
        if prog == "time" and any(a in ("-o", "--output") or a.startswith("--output=")
                                  for a in args[:len(args) - len(rest)]):
            walk.raise_to("write", "time -o writes a file")
            walk.paths.append("*")
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
        if prog == "xargs":
            walk.raise_to("read", "xargs runs its command with input as arguments")
            # Its input becomes arguments: paths unknown.
            if "*" not in walk.paths:
                walk.paths.append("*")
        _argv(walk, rest, expanded[n:])
        return
    if prog == "su":
        if any(a in ("-s", "--shell", "-p", "-m", "--preserve-environment") or
               a.startswith("--shell=") for a in args):
            raise _Unknown("su with a shell or the caller's environment is not analysed")
        body = _option_value(args, ("-c", "--command"))
        if body is None:
            raise _Unknown("su without -c runs an interactive shell")
        walk.raise_to("admin", "runs as another user (su)")
        _nested(walk, body, "su -c")
        return
    if prog in SHELLS:
        options = []
        for a in args:
            if not a.startswith("-"):
                break
            options.append(a)
        if any(a in ("--rcfile", "--init-file", "--login") or
               (not a.startswith("--") and ("i" in a or "l" in a)) for a in options):
            raise _Unknown(f"{prog} as an interactive or login shell runs its start-up "
                           "files")
        body = _option_value(args, ("-c",))
        if body is None or prog in ("busybox", "fish", "csh", "tcsh"):
            raise _Unknown(f"{prog} runs a script or its input, which keyturn cannot see")
        if _expanded_at(args, args_expanded, body):
            raise _Unknown(f"{prog} -c with a body built from variables")
        _nested(walk, body, f"{prog} -c")
        return
    if prog in INTERPRETERS:
        raise _Unknown(f"{prog} runs code keyturn cannot see into")
    if prog in ASSIGNING:
        _assigning(prog, args)
        return
    if prog == "printf":
        for i, a in enumerate(args):
            if a == "-v" and i + 1 < len(args):
                _check_name(args[i + 1])
            elif a.startswith("-v") and len(a) > 2:
                _check_name(a[2:])
    if prog in UNSEEABLE_BUILTINS:
        if prog == "eval" and args and not any(args_expanded):
            _nested(walk, " ".join(args), "eval")
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
                _argv(walk, args[i:], args_expanded[i:])
            return
        raise _Unknown(f"the builtin {prog} changes how later commands run")
    if prog == "cd":
        target = next((a for a in args if not a.startswith("-")), "~")
        if any(args_expanded) or "-" in args or target.startswith("~") and target != "~" \
                and not target.startswith("~/"):
            walk.cwd = None
        else:
            walk.cwd = _resolve(target, walk.cwd) if walk.cwd is not None else None
        return
    if prog == "find":
        _find(walk, args, args_expanded)
        return
    for opt in EXEC_OPTIONS.get(prog, ()):
        if any(a == opt or (opt.startswith("--") and _long(a, opt))
               or (not opt.startswith("--") and len(opt) == 2 and a.startswith(opt)
                   and not a.startswith("--"))
               for a in args):
            raise _Unknown(f"{prog} {opt} may run a command of the caller's choosing")
    cls, why = _program_class(prog, args)
    walk.raise_to(cls, why)
    if prog == "sed":
        operands = [a for a in args if not a.startswith("-")]
        if not any(a in ("-e", "--expression") or a.startswith("--expression=")
                   for a in args):
            operands = operands[1:]  # the script
        args = [a for a in args if a.startswith("-")] + operands
    for a, e in zip(args, args_expanded, strict=False):
        if a == "{}":
            continue  # find -exec's placeholder: find's own paths stand for it
        if e:
            if "*" not in walk.paths:
                walk.paths.append("*")  # a variable may name any file
        elif a and not a.startswith("-"):
            # Any operand may be a file name (relative to the tracked directory).
            walk.path(a)


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
    if prog == "sed":
        _sed(args)
        if any(a == "-i" or a.startswith(("-i", "--in-place")) or
               (a.startswith("-") and not a.startswith("--") and "i" in a[1:])
               for a in args):
            return "write", "sed -i edits files in place"
        return "read", "sed without -i only prints"
    if prog == "sort" and any(_long(a, "--output") or _long(a, "--compress-program") or
                              (a.startswith("-") and not a.startswith("--") and "o" in a)
                              for a in args):
        return "write", "sort -o writes a file"
    if prog == "uniq" and len([a for a in args if not a.startswith("-")]) >= 2:
        return "write", "uniq INPUT OUTPUT writes a file"
    if prog == "xxd" and any(a.startswith("-") and "r" in a for a in args):
        return "write", "xxd -r writes a file"
    if prog == "dmesg" and any(a in ("-C", "-c", "-D", "-E", "-n") or _long(a, "--clear") or
                               _long(a, "--read-clear") or _long(a, "--console-off") or
                               _long(a, "--console-on") or _long(a, "--console-level")
                               for a in args):
        return "admin", "dmesg clears the ring buffer or changes the console"
    if prog == "date" and any(not a.startswith(("-", "+")) for a in args):
        return "admin", "date MMDDhhmm sets the clock"
    if prog == "hostname" and any(a.startswith(("-F", "-b")) or _long(a, "--file") or
                                  _long(a, "--boot") for a in args):
        return "admin", "hostname -F renames the host"
    if prog == "rsync":
        if any(_long(a, "--delete") or _long(a, "--remove-source-files") or
               a.startswith("--del") for a in args):
            return "destructive", "rsync --delete removes files"
        if any(a.startswith("-") and not a.startswith("--") and "e" in a for a in args):
            raise _Unknown("rsync -e runs a command of the caller's choosing")
    if prog == "tar":
        first = args[0] if args else ""
        if any(a in ("-t", "--list") for a in args) or (
                not first.startswith("--") and "t" in first.lstrip("-")
                and first.lstrip("-").isalpha()):
            return "read", "tar -t only lists"
        return "write", "tar creates or extracts files"
    if prog == "date" and any(a in ("-s", "--set") or a.startswith("--set=") for a in args):
        return "admin", "date --set changes the clock"
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


def _sed(args: list[str]) -> None:
    """sed scripts may run commands (``e``, ``s///e``) or write files (``w``): only
    scripts of plain commands are analysed (anything else is unknown)."""
    scripts: list[str] = []
    i, positional = 0, True
    while i < len(args):
        a = args[i]
        if a in ("-e", "--expression"):
            scripts.append(args[i + 1] if i + 1 < len(args) else "")
            positional = False
            i += 2
            continue
        if a.startswith("--expression="):
            scripts.append(a.split("=", 1)[1])
            positional = False
        elif _long(a, "--file") or (a.startswith("-") and not a.startswith("--")
                                     and "f" in a):
            raise _Unknown("sed -f runs a script file keyturn cannot see")
        elif not a.startswith("-") and positional:
            scripts.append(a)
            positional = False
        i += 1
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


def _assigning(prog: str, args: list[str]) -> None:
    if prog in ("declare", "typeset", "export", "local", "readonly") and any(
            a.startswith("-") and a not in ("-r", "-x", "-i", "-a", "-A", "-l", "-u")
            for a in args):
        raise _Unknown(f"{prog} with options keyturn does not analyse")
    for a in args:
        if a.startswith("-"):
            continue
        name = a.split("=", 1)[0]
        if _NAME.match(name):
            _check_name(name)


def _long(arg: str, option: str) -> bool:
    """Whether ``arg`` is the long option ``option`` as GNU programs read it: in full, or
    any unambiguous-looking prefix of it of three letters or more, with or without a
    ``=value``."""
    if not arg.startswith("--"):
        return False
    name = arg.split("=", 1)[0]
    return len(name) >= 5 and option.startswith(name)


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
            _argv(walk, inner, expanded[i + 1:j])
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
                walk.path(a)
        i += 1


def _after_options(args: list[str], valued: frozenset[str], prog: str) -> list[str]:
    """The arguments after a wrapper's own options: the command it runs."""
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return args[i + 1:]
        if not a.startswith("-") or a == "-":
            if prog == "env" and a == "-":
                i += 1
                continue
            return args[i:]
        if a in valued:
            i += 2
            continue
        if prog in ("nice",) and a[1:].isdigit():
            i += 1
            continue
        i += 1
    return []


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


def _nested(walk: _Walk, body: str, how: str) -> None:
    walk.raise_to("read", f"{how} body analysed")
    walk.depth += 1
    saved = walk.cwd
    try:
        _parse_into(walk, body)
    finally:
        walk.depth -= 1
        walk.cwd = saved


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
        return "/" + posixpath.normpath(word).lstrip("/")
    if word == "~" or word.startswith("~/"):
        return posixpath.normpath(word)
    if word.startswith("~") or cwd is None:
        return "*"
    if ".." in cwd.split("/"):
        return "*"
    return posixpath.normpath(posixpath.join(cwd, word))


__all__ = ["CLASSES", "ShellAction", "classify"]
