#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# install.sh: install jobrunner on this machine, or remove it (see INSTALL.md).
#
# Every file is rewritten only when its content differs, so running it again is safe and converges on the
# same state; units are reloaded and the socket restarted only when something changed.

set -euo pipefail

PROG=install.sh
PREFIX=/usr/local
LIBDIR=$PREFIX/lib/jobrunner
UNITDIR=$PREFIX/lib/systemd/system
BINDIR=$PREFIX/bin
SBINDIR=$PREFIX/sbin
DOCDIR=$PREFIX/share/doc/jobrunner
MANDIR=$PREFIX/share/man
CONFDIR=/etc/jobrunner
CONFIG=$CONFDIR/jobs.toml
SOCKET_DROPIN=/etc/systemd/system/job.socket.d/10-install.conf
SERVICE_DROPIN=/etc/systemd/system/job@.service.d/10-install.conf
JOB_UNITS_DROPIN=$CONFDIR/job-units.conf  # linked into every job's units by the generator
API_UNITS_DROPIN=$CONFDIR/api-units.conf  # linked into every API's proxy by the generator
GENERATOR=$PREFIX/lib/systemd/system-generators/jobrunner-generator
LEGACY_DROPINS=/etc/systemd/system/job@.service.d/50-credential-  # NAME.conf: before one unit per job
SYSUSERS=/etc/sysusers.d/jobrunner.conf
TMPFILES=/etc/tmpfiles.d/jobrunner.conf
CREDSTORE=/etc/credstore.encrypted
CACHEDIR=/var/cache/jobrunner  # the parsed copy of $CONFIG (jobrunner-config.service)
PYTHON=/usr/bin/python3
APT_PACKAGES=(python3 python3-systemd python3-sdnotify python3-h11)
MIN_SYSTEMD=252
DEFAULT_GROUP=jobrunner
DEFAULT_TASKS_MAX=64
DEFAULT_MEMORY_MAX=1G
# Paths that go into unit files: no spaces, quotes, '%' (a specifier) or '\' (an escape).
SAFE_PATH='^/[A-Za-z0-9._/@+-]*$'

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
    cat <<EOF
usage: sudo ./$PROG --project DIR [--group NAME] [--tasks-max N] [--memory-max SIZE] [--no-apt]
       sudo ./$PROG --uninstall

Install jobrunner: the code in $LIBDIR, the commands jobctl, jobrunner-trigger
and jobrunner, the units job.socket and job@.service (the front door), the
generator that makes each job's own units from $CONFIG, jobrunner-config.path
(applies every change of $CONFIG), the developer group and the front door's
user, the outputs and logs directories, and an example $CONFIG if there is
none. Then check the units with systemd-analyze verify and start the sockets.
Running it again is safe, and upgrades an earlier installation in place.

options:
  --project DIR      the project the jobs run in; read-only to jobs (required)
  --group NAME       the developer group: may connect to the socket, reads and
                     deletes outputs and logs (default: $DEFAULT_GROUP)
  --tasks-max N      at most N processes and threads per run (default: $DEFAULT_TASKS_MAX)
  --memory-max SIZE  memory limit per run, e.g. 512M, 2G (default: $DEFAULT_MEMORY_MAX)
  --no-apt           do not install missing packages (${APT_PACKAGES[*]});
                     fail instead
  --uninstall        remove what install.sh installed; keeps credentials,
                     $CONFIG, the outputs and logs, and the group
  -h, --help         show this help

exit status:
  0   success
  1   a command failed (its output says why)
  64  usage error
  66  the project directory does not exist
  69  a requirement is missing (systemd $MIN_SYSTEMD+ as PID 1, Python 3.11+, packages)
  77  not run as root
  78  $CONFIG is invalid or names another project, or the units do not verify
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*"; }
step() { printf '\n%s: == %s\n' "$PROG" "$*"; }

die() { # die STATUS MESSAGE [HINT]
    printf '%s: error: %s\n' "$PROG" "$2" >&2
    if [ $# -ge 3 ] && [ -n "$3" ]; then
        printf '%s: hint: %s\n' "$PROG" "$3" >&2
    fi
    exit "$1"
}

usage_error() {
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    printf 'Try "./%s --help".\n' "$PROG" >&2
    exit 64
}

# ---------------------------------------------------------------------------------------------------
# Files: written only when they change

CHANGED=()

# put SOURCE DEST MODE: install SOURCE as DEST (root-owned) unless DEST already has the same content.
put() {
    local src=$1 dest=$2 mode=$3
    if [ -f "$dest" ] && [ ! -L "$dest" ] && cmp -s "$src" "$dest"; then
        chmod "$mode" "$dest"
        chown root:root "$dest"
        return
    fi
    mkdir -p "$(dirname "$dest")"
    install -m "$mode" -o root -g root "$src" "$dest.jobrunner-new"
    mv -f "$dest.jobrunner-new" "$dest"
    CHANGED+=("$dest")
    say "wrote $dest"
}

# put_text DEST MODE: install standard input as DEST.
put_text() {
    local tmp
    tmp=$(mktemp)
    cat >"$tmp"
    put "$tmp" "$1" "$2"
    rm -f "$tmp"
}

changed() { # changed PATH...: did any of these change in this run?
    local path item
    for path in "$@"; do
        for item in "${CHANGED[@]+"${CHANGED[@]}"}"; do
            [ "$item" = "$path" ] && return 0
        done
    done
    return 1
}

# sources NAME: the package's modules, subpackages included (runner/doctor/), as sorted relative paths.
sources() {
    (cd "$1" && find . -name '*.py' -not -path '*/__pycache__/*' | LC_ALL=C sort)
}

# same_package NAME: does $LIBDIR/NAME hold exactly the repository's NAME/**/*.py, byte-compiled?
same_package() {
    local name=$1 file
    [ -d "$LIBDIR/$name/__pycache__" ] || return 1
    [ "$(sources "$SRC/$name")" = "$(sources "$LIBDIR/$name")" ] || return 1
    while IFS= read -r file; do
        cmp -s "$SRC/$name/$file" "$LIBDIR/$name/$file" || return 1
    done < <(sources "$SRC/$name")
}

# put_package NAME: install $SRC/NAME/**/*.py as $LIBDIR/NAME, byte-compiled, replacing it whole when any
# source differs (so that a module removed from the repository disappears here too).
put_package() {
    local name=$1 dest=$LIBDIR/$1 new file
    if same_package "$name"; then
        return
    fi
    rm -rf "$LIBDIR/.$name".* # what an interrupted run may have left
    new=$(mktemp -d "$LIBDIR/.$name.XXXXXX")
    sources "$SRC/$name" | while IFS= read -r file; do
        install -D -m 0644 -o root -g root "$SRC/$name/$file" "$new/$file"
    done
    # Byte-compiled now: the sandbox's file system is read-only, so Python would otherwise compile every
    # module again on every connection.
    "$PYTHON" -m compileall -q "$new"
    chmod -R u=rwX,go=rX "$new"
    rm -rf "$dest.jobrunner-old"
    if [ -d "$dest" ]; then
        mv "$dest" "$dest.jobrunner-old"
    fi
    mv "$new" "$dest"
    rm -rf "$dest.jobrunner-old"
    CHANGED+=("$dest")
    say "installed $dest (byte-compiled)"
}

# ---------------------------------------------------------------------------------------------------
# Requirements

require_root() {
    [ "$(id -u)" -eq 0 ] || die 77 "must run as root" "sudo ./$PROG $*"
}

require_systemd() {
    [ -d /run/systemd/system ] ||
        die 69 "systemd is not running as PID 1 on this machine" \
            "jobrunner needs systemd $MIN_SYSTEMD+ as the init system (in a container: boot it with systemd-nspawn --boot)"
    local version
    version=$(systemctl --version | awk 'NR == 1 { print $2 }')
    version=${version%%[!0-9]*}
    if [ -z "$version" ] || [ "$version" -lt "$MIN_SYSTEMD" ]; then
        die 69 "systemd ${version:-?} is too old, jobrunner needs $MIN_SYSTEMD or newer" \
            "Debian 12 (bookworm) or Ubuntu 24.04 and later have it"
    fi
}

# What the runner imports beyond the standard library, and the packages that provide it.
missing_packages() {
    local missing=()
    if ! [ -x "$PYTHON" ] || ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        missing+=(python3)
    else
        "$PYTHON" -c 'import systemd.journal' 2>/dev/null || missing+=(python3-systemd)
        "$PYTHON" -c 'import sdnotify' 2>/dev/null || missing+=(python3-sdnotify)
        "$PYTHON" -c 'import h11' 2>/dev/null || missing+=(python3-h11)
    fi
    echo "${missing[*]}"
}

require_packages() {
    local missing
    missing=$(missing_packages)
    if [ -z "$missing" ]; then
        say "python3 (3.11+), python3-systemd, python3-sdnotify and python3-h11 are installed"
        return
    fi
    if [ "$NO_APT" = 1 ]; then
        die 69 "missing: $missing (and --no-apt was given)" "install them: sudo apt-get install $missing"
    fi
    command -v apt-get >/dev/null || die 69 "missing: $missing, and there is no apt-get" \
        "install them with this system's package manager, then run $PROG again"
    say "installing $missing with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086 # one word per package
    if ! apt-get install -y --no-install-recommends $missing; then
        apt-get update
        # shellcheck disable=SC2086
        apt-get install -y --no-install-recommends $missing
    fi
    missing=$(missing_packages)
    [ -z "$missing" ] || die 69 "still missing after apt-get: $missing" \
        "jobrunner needs Python 3.11 or newer (Debian 12, Ubuntu 24.04 and later)"
}

# ---------------------------------------------------------------------------------------------------
# What gets installed

install_code() {
    mkdir -p "$LIBDIR"
    chmod 0755 "$LIBDIR"
    put_package runner
    put_package trigger
}

install_commands() {
    # A Python script, not a shell wrapper around `python3 -m trigger`: every developer command pays
    # for sh, runpy and site otherwise (~5 ms). -I: ignore PYTHON* variables and the user's site
    # directory; -S: no site module at all (jobctl needs only the standard library).
    put_text "$BINDIR/jobctl" 0755 <<EOF
#!$PYTHON -IS
# jobctl: run a jobrunner job (installed by jobrunner's install.sh; see jobctl --help)
import gc
import sys

gc.disable()  # while importing: jobctl's run() turns it back on
sys.path.insert(0, "$LIBDIR")
from trigger.preconnect import main

main()  # connects to the socket before it imports the rest of jobctl (see trigger/preconnect.py)
EOF
    put_text "$SBINDIR/jobrunner" 0755 <<EOF
#!/bin/sh
# jobrunner: administer jobrunner (installed by jobrunner's install.sh; see jobrunner --help)
PYTHONPATH=$LIBDIR exec $PYTHON -P -m runner.admin "\$@"
EOF
    # The same client in POSIX sh and socat, for machines and CI images without Python.
    put "$SRC/trigger/trigger_job.sh" "$BINDIR/jobrunner-trigger" 0755
    # systemd runs it at boot and at every daemon-reload: the units of each job (runner/generator.py).
    put_text "$GENERATOR" 0755 <<EOF
#!$PYTHON -PS
# jobrunner's systemd generator (installed by jobrunner's install.sh): each job's own units.
import sys

sys.path.insert(0, "$LIBDIR")
from runner.generator import main

sys.exit(main(sys.argv))
EOF
}

# The documentation as the repository lays it out, so that README's links to docs/... work here too.
install_docs() {
    local doc
    for doc in README.md INSTALL.md docs/protocol.md docs/performance.md docs/ci.md docs/testing.md; do
        if [ -f "$SRC/$doc" ]; then
            put "$SRC/$doc" "$DOCDIR/$doc" 0644
        fi
    done
    rm -f "$DOCDIR/protocol.md"  # where installs before 2026-12 put it
}

# The manual pages: the repository's man/PAGE as $MANDIR/manN/PAGE, where man(1) looks for them.
MAN_PAGES=(man1/jobctl.1 man5/jobs.toml.5 man8/jobrunner.8 man8/job@.service.8)

install_man() {
    local page dir
    for page in "${MAN_PAGES[@]}"; do
        # Missing directories are made 0755 whatever root's umask (man runs as the reader); existing
        # ones keep their mode and owner (Debian's /usr/local/share/man is 2775 root:staff).
        for dir in "$MANDIR" "$MANDIR/${page%%/*}"; do
            [ -d "$dir" ] || install -d -m 0755 "$dir"
        done
        put "$SRC/man/${page#*/}" "$MANDIR/$page" 0644
    done
}

UNITS=(job.socket job@.service jobrunner-config.path jobrunner-config.service)

install_units() {
    local unit
    for unit in "${UNITS[@]}"; do
        put "$SRC/units/$unit" "$UNITDIR/$unit" 0644
    done
    # The template of every job's units, read by the generator (not a unit file itself).
    put "$SRC/units/job-NAME@.service.in" "$LIBDIR/units/job-NAME@.service.in" 0644
    # And of every API's proxy ([apis.NAME] in jobs.toml).
    put "$SRC/units/jobrunner-api-NAME@.service.in" "$LIBDIR/units/jobrunner-api-NAME@.service.in" 0644
}

install_group() {
    put_text "$SYSUSERS" 0644 <<EOF
# jobrunner's developer group: may connect to /run/job.sock, reads and deletes outputs and logs.
# Add a developer with: usermod -aG $GROUP USER. See sysusers.d(5). Written by install.sh.
g $GROUP -
# The front door's user (job@.service): the jobs' units take a handed-over connection only from it.
u jobrunner-dispatch - "jobrunner front door" - -
# Every job's units (each job has a transient user of its own) and no one else: the lock directory's.
g jobrunner-jobs -
EOF
    systemd-sysusers "$SYSUSERS"
}

install_config() {
    if [ -e "$CONFIG" ]; then
        say "kept $CONFIG (it exists)"
        return
    fi
    local example=$SRC/examples/jobs.toml tmp
    tmp=$(mktemp)
    if [ -f "$example" ]; then
        sed "s|@PROJECT@|$PROJECT|g" "$example" >"$tmp"
    else
        cat >"$tmp" <<EOF
# jobrunner's jobs (see INSTALL.md). Read at every connection: no restart needed after editing.
# Check it with: sudo jobrunner check

[runner]
project = "$PROJECT"
# outputs = "outputs"   # default: PROJECT/outputs; re-run install.sh after changing outputs or logs
# logs = "logs"         # default: PROJECT/logs

[jobs.hello]
description = "Says hello"
command = ["/bin/echo", "hello from jobrunner"]
EOF
    fi
    mkdir -p "$CONFDIR"
    chmod 0755 "$CONFDIR"
    put "$tmp" "$CONFIG" 0644
    rm -f "$tmp"
}

# Sets OUTPUTS and LOGS from the configuration, with the runner's own parser (so that a broken file is
# reported exactly as the service would report it).
read_config() {
    local out
    if ! out=$(PYTHONPATH=$LIBDIR "$PYTHON" -P -c '
import sys
from runner.config import load_config
from runner.errors import RunnerError
try:
    c = load_config()
except RunnerError as e:
    sys.exit(f"{e.message}\n{e.hint}")
print(c.project, c.outputs, c.logs, sep="\n")
' 2>&1); then
        die 78 "$(head -n 1 <<<"$out")" "$(tail -n +2 <<<"$out")"
    fi
    local project
    { read -r project && read -r OUTPUTS && read -r LOGS; } <<<"$out"
    [ "$project" = "$PROJECT" ] ||
        die 78 "$CONFIG says project = \"$project\", but --project is $PROJECT" \
            "run $PROG --project $project, or change project in $CONFIG"
    local dir
    for dir in "$OUTPUTS" "$LOGS"; do
        [[ $dir =~ $SAFE_PATH ]] ||
            die 78 "$CONFIG: outputs and logs must be absolute paths of letters, digits and ._/@+-, not $dir" ""
        if [ "$dir" = "$PROJECT" ] || [ "$dir" = / ]; then
            die 78 "$CONFIG: outputs and logs must be directories of their own, not $dir" \
                "the defaults are $PROJECT/outputs and $PROJECT/logs"
        fi
    done
}

install_directories() {
    put_text "$TMPFILES" 0644 <<EOF
# jobrunner's outputs and logs: owned by root and the developer group, setgid so that every file the
# service creates belongs to the group; nothing for other users. See tmpfiles.d(5). Written by install.sh.
d $OUTPUTS 2770 root $GROUP -
d $LOGS 2770 root $GROUP -
# The jobs' lock files (concurrency, max_runs_per_user): every job's user, through the group
# jobrunner-jobs; setgid, so that each lock file is the group's; sticky, so that none deletes another's.
d /run/jobrunner-locks 3770 root jobrunner-jobs -
EOF
    systemd-tmpfiles --create "$TMPFILES" ||
        die 1 "systemd-tmpfiles could not create $OUTPUTS and $LOGS (see above)" \
            "every directory above them must be owned by root or by one and the same user"
}

# The directories python-systemd and sdnotify are in: job@.service runs python3 with -S (no `site`),
# so they go on PYTHONPATH by name.
python_deps_path() {
    "$PYTHON" -P -c '
import os, h11, sdnotify, systemd
print(":".join(dict.fromkeys(os.path.dirname(os.path.dirname(m.__file__)) for m in (systemd, sdnotify, h11))))
'
}

install_dropins() {
    local deps
    deps=$(python_deps_path) ||
        die 69 "$PYTHON cannot import systemd, sdnotify and h11" \
            "install python3-systemd, python3-sdnotify and python3-h11"
    [[ $deps =~ ^/[A-Za-z0-9._/@+:-]*$ ]] ||
        die 69 "python-systemd or sdnotify is in a directory unit files cannot name: $deps" ""
    put_text "$SOCKET_DROPIN" 0644 <<EOF
# Written by install.sh (--group $GROUP): run it again rather than editing this file.
[Socket]
SocketGroup=$GROUP
EOF
    put_text "$SERVICE_DROPIN" 0644 <<EOF
# Written by install.sh: run it again rather than editing this file. For the front door (job@.service)
# and the operators' job@NAME.service; each job's own settings are in $JOB_UNITS_DROPIN.
[Service]
# The runner's code, then where this machine's python3 has python-systemd and sdnotify (-S: no site).
Environment=PYTHONPATH=$LIBDIR:$deps
# The front door connects to the jobs' sockets, which are the developers' (root:$GROUP, 0660), and
# reads the run logs (2770 root:$GROUP) for history, logs and status.
SupplementaryGroups=$GROUP
# The run logs, read-only, where the front door looks for them (runner/history.py): not at $LOGS, which
# ProtectHome=yes hides when it is under /home, nor over it, where the operators' job@NAME.service (which
# get this drop-in too) have them writable. "-": without the directory only history, logs and status
# fail (saying so), not every request.
BindReadOnlyPaths=-$LOGS:/tmp/.jobrunner-logs
Environment=JOBRUNNER_LOGS_VIEW=/tmp/.jobrunner-logs
EOF
    put_text "$JOB_UNITS_DROPIN" 0644 <<EOF
# Written by install.sh: run it again rather than editing this file. jobrunner's generator links it
# into the units of every job (job-NAME@.service.d/10-job-units.conf); a job's own settings come after
# it (30-job-profile.conf, from jobs.toml), your drop-ins for a job after that (see INSTALL.md).
[Service]
# The runner's code, then where this machine's python3 has python-systemd and sdnotify (-S: no site).
Environment=PYTHONPATH=$LIBDIR:$deps
# The project, read-only (also under /home, which ProtectHome=tmpfs hides otherwise).
BindReadOnlyPaths=$PROJECT
# Where runs write: OUTPUTS/JOB/RUN_ID/ and LOGS/JOB/RUN_ID.log (see $CONFIG).
BindPaths=$OUTPUTS $LOGS
# Only to share outputs and logs with the developers.
SupplementaryGroups=$GROUP
# The defaults; a job's memory_max and tasks_max override them.
TasksMax=$TASKS_MAX
MemoryMax=$MEMORY_MAX
EOF
    put_text "$API_UNITS_DROPIN" 0644 <<EOF
# Written by install.sh: run it again rather than editing this file. jobrunner's generator links it
# into the proxy of every API (jobrunner-api-NAME@.service.d/10-api-units.conf).
[Service]
# The runner's code, then where this machine's python3 has h11 (and python-systemd for the journal).
Environment=PYTHONPATH=$LIBDIR:$deps
EOF
}

# Before one unit per job, `jobrunner creds set` loaded every credential into every run with a drop-in
# of job@.service. The credentials stay (in $CREDSTORE); the drop-ins go, so that the front door and
# the jobs that do not name a credential never load it.
migrate_credential_dropins() {
    local dropin
    for dropin in "$LEGACY_DROPINS"*.conf; do
        [ -e "$dropin" ] || continue
        rm -f "$dropin"
        CHANGED+=("$dropin")
        say "removed $dropin: a job now loads only the credentials it names in $CONFIG"
    done
    for dropin in /etc/systemd/system/job@.service.d/*.conf; do
        if [ ! -e "$dropin" ] || [ "$dropin" = "$SERVICE_DROPIN" ]; then
            continue
        fi
        say "warning: $dropin applies to the front door (job@.service) and to operators' runs, not to"
        say "warning: socket runs: move it to /etc/systemd/system/job-NAME@.service.d/ for job NAME"
    done
}

# systemd-analyze verify, keeping only what it says about our units: it also loads their dependencies
# and may complain about units that are none of our business.
verify_units() {
    local out ours
    out=$(cd / && systemd-analyze verify job.socket job@verify.service jobrunner-config.path \
        jobrunner-config.service 2>&1) || true
    ours=$(grep -E 'job\.socket|job@|jobrunner|/etc/systemd/system/job' <<<"$out" || true)
    if [ -n "$ours" ]; then
        printf '%s\n' "$ours" >&2
        die 78 "systemd-analyze verify reports problems in jobrunner's units (above)" \
            "fix the drop-ins in /etc/systemd/system/job@.service.d/ or job.socket.d/, then run $PROG again"
    fi
    say "systemd-analyze verify: job.socket, job@.service and jobrunner-config.{path,service} are clean"
}

start_socket() {
    systemctl daemon-reload  # also runs the generator: the jobs' units
    systemctl enable job.socket --quiet
    if ! systemctl is-active --quiet job.socket; then
        systemctl start job.socket
        say "started job.socket"
    elif changed "$UNITDIR/job.socket" "$SOCKET_DROPIN"; then
        # A new group or mode only applies to a freshly created socket. Runs in progress go on.
        systemctl restart job.socket
        say "restarted job.socket (its configuration changed)"
        # The jobs' sockets link the same drop-in (the group): they need a fresh socket too.
        local sockets
        sockets=$(systemctl list-units --plain --no-legend 'job-*.socket' | awk '$1 ~ /\.socket$/ { print $1 }')
        if [ -n "$sockets" ]; then
            # shellcheck disable=SC2086 # one word per unit
            systemctl restart $sockets
            say "restarted the jobs' sockets: ${sockets//$'\n'/ }"
        fi
    else
        say "job.socket is running"
    fi
}

# The parsed copy of the configuration that connections use (runner/config_cache.py): refreshed now, and
# by jobrunner-config.path whenever the file changes.
start_config_watch() {
    systemctl enable --now jobrunner-config.path --quiet
    if changed "$UNITDIR/jobrunner-config.path"; then
        systemctl restart jobrunner-config.path  # a running path unit keeps its old watch otherwise
    fi
    if ! systemctl start jobrunner-config.service; then
        journalctl -u jobrunner-config.service -n 20 --no-pager -o cat >&2 || true
        die 78 "jobrunner-config.service could not check $CONFIG (above)" "sudo jobrunner check"
    fi
    say "checked $CONFIG; jobrunner-config.path refreshes its parsed copy in $CACHEDIR on every change"
}

check_project_readable() {
    # The service runs as a dynamic uid that is neither the owner nor (usually) in the project's group.
    if [ -z "$(find "$PROJECT" -maxdepth 0 -perm -o=rx)" ]; then
        say "warning: $PROJECT is not readable by other users; the jobs run as a dynamic user and"
        say "warning: will not be able to read it (chmod o+rx, or make it group-owned by $GROUP with g+rx)"
    fi
}

summary() {
    local sock
    sock=$(stat -c '%U:%G %a' /run/job.sock 2>/dev/null || echo "not there?")
    if [ "${#CHANGED[@]}" -eq 0 ]; then
        printf '\n%s: nothing changed: jobrunner was already installed like this\n' "$PROG"
    fi
    cat <<EOF

$PROG: == done
  code        $LIBDIR (runner, trigger; byte-compiled)
  commands    $BINDIR/jobctl, $BINDIR/jobrunner-trigger, $SBINDIR/jobrunner
  units       $UNITDIR/job.socket, job@.service, jobrunner-config.path, .service
  drop-ins    $SOCKET_DROPIN
              $SERVICE_DROPIN
              $JOB_UNITS_DROPIN (in every job's units)
  generator   $GENERATOR: job-NAME.socket, job-NAME@.service, job@NAME.service for each job
  group, user $GROUP, jobrunner-dispatch (the front door's) ($SYSUSERS)
  directories $OUTPUTS, $LOGS (2770 root:$GROUP, $TMPFILES)
  manuals     $MANDIR: jobctl(1), jobs.toml(5), jobrunner(8), job@.service(8)
  config      $CONFIG (parsed copy in $CACHEDIR, refreshed by jobrunner-config.path)
  socket      /run/job.sock ($sock), job.socket enabled and running

Next:
  add a developer:     sudo usermod -aG $GROUP USER   (they log in again afterwards)
  store a credential:  sudo jobrunner creds set NAME   (reads the secret from stdin)
  define jobs:         sudo editor $CONFIG   (applied on save; sudo jobrunner check shows how)
  run a job:           jobctl list; jobctl run hello
  as an operator:      sudo systemctl start job@hello; journalctl -u job@hello
EOF
}

# ---------------------------------------------------------------------------------------------------
# Uninstall

uninstall() {
    step "stopping job.socket and runs in progress"
    if systemctl list-unit-files job.socket >/dev/null 2>&1; then
        systemctl disable --now job.socket --quiet 2>/dev/null || true
    fi
    if systemctl list-unit-files jobrunner-config.path >/dev/null 2>&1; then
        systemctl disable --now jobrunner-config.path --quiet 2>/dev/null || true
    fi
    systemctl stop 'job-*.socket' 'job@*.service' 'job-*@*.service' \
        'jobrunner-api-*.socket' 'jobrunner-api-*@*.service' 2>/dev/null || true

    # What the kept directories and group are, before the files that name them go.
    local dirs="" group=""
    if [ -f "$TMPFILES" ]; then
        dirs=$(awk '$1 == "d" && $2 !~ /^\/run\// { printf "%s%s", sep, $2; sep = ", " }' "$TMPFILES")
        group=$(awk '$1 == "d" { print $5; exit }' "$TMPFILES")
    fi

    step "removing files"
    local path page removed=()
    for path in "$BINDIR/jobctl" "$BINDIR/jobrunner-trigger" "$SBINDIR/jobrunner" \
        "$UNITDIR/job.socket" "$UNITDIR/job@.service" "$UNITDIR/jobrunner-config.path" \
        "$UNITDIR/jobrunner-config.service" "$SOCKET_DROPIN" "$SERVICE_DROPIN" "$JOB_UNITS_DROPIN" \
        "$API_UNITS_DROPIN" /run/jobrunner-locks "$GENERATOR" "$SYSUSERS" "$TMPFILES" "$LIBDIR" "$DOCDIR" "$CACHEDIR"; do
        if [ -e "$path" ] || [ -L "$path" ]; then
            rm -rf "$path"
            removed+=("$path")
            say "removed $path"
        fi
    done
    for page in "${MAN_PAGES[@]}"; do
        path=$MANDIR/$page
        if [ -e "$path" ]; then
            rm -f "$path"
            removed+=("$path")
            say "removed $path"
        fi
    done
    rmdir --ignore-fail-on-non-empty /etc/systemd/system/job.socket.d /etc/systemd/system/job@.service.d \
        "$UNITDIR" 2>/dev/null || true
    systemctl daemon-reload
    systemctl reset-failed 'job@*.service' 'job-*' 'jobrunner-api-*' job.socket jobrunner-config.service \
        2>/dev/null || true

    local creds=()
    if [ -d "$CREDSTORE" ]; then
        mapfile -t creds < <(find "$CREDSTORE" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort)
    fi
    cat <<EOF

$PROG: == uninstalled (${#removed[@]} paths removed)
Kept on purpose (a new install.sh picks them up again):
  credentials    $CREDSTORE/: ${creds[*]:-none}
                 remove one with \`jobrunner creds rm NAME\` before uninstalling, or delete it by hand
  configuration  $CONFIG$( [ -e "$CONFIG" ] || echo " (not there)")
  outputs, logs  ${dirs:-the directories named in $CONFIG}, with every run's results
  group          ${group:-the developer group}: it owns the outputs and logs; groupdel it once they are gone
EOF
}

# ---------------------------------------------------------------------------------------------------

PROJECT=
GROUP=$DEFAULT_GROUP
TASKS_MAX=$DEFAULT_TASKS_MAX
MEMORY_MAX=$DEFAULT_MEMORY_MAX
NO_APT=0
UNINSTALL=0
ARGS=("$@")

need_value() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then
        usage_error "$1 needs a value"
    fi
}

while [ $# -gt 0 ]; do
    case $1 in
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --project=*) PROJECT=${1#*=}; shift ;;
    --group) need_value "$@"; GROUP=$2; shift 2 ;;
    --group=*) GROUP=${1#*=}; shift ;;
    --tasks-max) need_value "$@"; TASKS_MAX=$2; shift 2 ;;
    --tasks-max=*) TASKS_MAX=${1#*=}; shift ;;
    --memory-max) need_value "$@"; MEMORY_MAX=$2; shift 2 ;;
    --memory-max=*) MEMORY_MAX=${1#*=}; shift ;;
    --no-apt) NO_APT=1; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown argument: $1" ;;
    esac
done

if [ "$UNINSTALL" = 1 ]; then
    [ -z "$PROJECT" ] || usage_error "--uninstall takes no other option"
    require_root --uninstall
    require_systemd
    uninstall
    exit 0
fi

[ -n "$PROJECT" ] || usage_error "--project DIR is required"
[[ $GROUP =~ ^[a-z_][a-z0-9_-]{0,30}$ ]] || usage_error "--group: not a valid group name: $GROUP"
[[ $TASKS_MAX =~ ^([1-9][0-9]*|infinity)$ ]] || usage_error "--tasks-max: a number or infinity, not $TASKS_MAX"
[[ $MEMORY_MAX =~ ^([1-9][0-9]*[KMGT]?|infinity)$ ]] ||
    usage_error "--memory-max: a size like 512M or 2G, or infinity, not $MEMORY_MAX"
[ -d "$PROJECT" ] || die 66 "--project $PROJECT: no such directory" "create it (or check the path) first"
PROJECT=$(realpath -e "$PROJECT")
if ! [[ $PROJECT =~ $SAFE_PATH ]] || [ "$PROJECT" = / ]; then
    die 64 "--project: the path must consist of letters, digits and ._/@+- (it goes into unit files): $PROJECT" \
        "use a directory with a plain name, e.g. /srv/project"
fi
for file in runner/__main__.py trigger/__main__.py trigger/trigger_job.sh units/job.socket units/job@.service \
    units/job-NAME@.service.in \
    units/jobrunner-config.path units/jobrunner-config.service; do
    [ -f "$SRC/$file" ] || die 66 "$SRC/$file is missing: run $PROG from a complete jobrunner checkout" ""
done

require_root "${ARGS[@]}"
require_systemd

step "packages"
require_packages
step "code, commands, documentation"
install_code
install_commands
install_docs
install_man
step "units"
install_units
step "developer group $GROUP"
install_group
step "configuration"
install_config
read_config
check_project_readable
step "outputs and logs"
install_directories
step "drop-ins"
install_dropins
migrate_credential_dropins
step "checking the units"
verify_units
step "job.socket"
start_socket
step "configuration watch"
start_config_watch
summary
