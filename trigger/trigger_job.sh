#!/bin/sh
# trigger_job.sh: run a jobrunner job with socat alone, over the text protocol (docs/protocol.md).
#
# For machines without Python (or without jobctl). Streams the job's output (stdout and stderr
# interleaved, byte for byte) to stdout, then the server's last line, and exits like jobctl:
#
#   N      the job's exit status (128+N if killed by signal N, 124 if it timed out)
#   64     usage error; server error bad-request, unknown-job, bad-arguments
#   69     cannot connect (no socket, nothing listening) or socat is missing
#   70     server error internal or an unknown code; a malformed last line
#   75     server error busy
#   77     permission denied on the socket; server error forbidden
#   78     server error config or credential
#   129, 130, 143   SIGHUP, SIGINT, SIGTERM: the connection was closed, which cancels the run
#   141    stdout was closed (trigger_job.sh x | head): the connection was closed, cancelling the run
#   255    the connection was lost before the server's last line
#
# Only when the server's last line is missing (the connection was lost) could a job's own output pass
# for it: the text protocol has no framing. Use jobctl --json where that matters.
# POSIX sh (dash is fine); needs socat, mktemp, mkfifo, tee and tail.

set -u

prog=trigger_job.sh
socket=${JOBCTL_SOCKET:-/run/job.sock}
start_hint='is job.socket running? sudo systemctl enable --now job.socket'
nl='
'
cr=$(printf '\r')

usage() {
    cat <<EOF
usage: $prog [-s SOCKET] NAME [ARG ...]

Run job NAME on the jobrunner socket with socat and the text protocol, stream
its output to stdout and exit with its exit status (see the top of this file
for every exit status).

  -s SOCKET  the socket (default: \$JOBCTL_SOCKET, else /run/job.sock)
  -h         show this help
EOF
}

fail() { # fail STATUS MESSAGE [HINT]
    printf '%s: error: %s\n' "$prog" "$2" >&2
    if [ $# -ge 3 ] && [ -n "$3" ]; then
        printf '%s: hint: %s\n' "$prog" "$3" >&2
    fi
    exit "$1"
}

# quote VALUE: sets $quoted to VALUE as one single-quoted shlex word ('it'"'"'s' for it's).
quote() {
    rest=$1
    quoted=
    while :; do
        case $rest in
        *\'*)
            quoted="$quoted${rest%%\'*}'\"'\"'"
            rest=${rest#*\'}
            ;;
        *) break ;;
        esac
    done
    quoted="'$quoted$rest'"
}

while getopts hs: opt; do
    case $opt in
    s) socket=$OPTARG ;;
    h)
        usage
        exit 0
        ;;
    *)
        usage >&2
        exit 64
        ;;
    esac
done
shift $((OPTIND - 1))
if [ $# -lt 1 ] || [ -z "$1" ]; then
    usage >&2
    exit 64
fi
[ -n "$socket" ] || socket=/run/job.sock
command -v socat >/dev/null 2>&1 || fail 69 "socat is not installed" "sudo apt-get install socat, or use jobctl"

# The request: one line. A plain job name goes as is; anything else, and every argument, is quoted.
name=$1
shift
case $name in
*[!A-Za-z0-9_.@:+=-]*)
    quote "$name"
    request="run $quoted"
    ;;
*) request="run $name" ;;
esac
for arg in "$@"; do
    case $arg in
    *"$nl"*) fail 64 "an argument contains a newline, which the one-line text protocol cannot carry" \
        "use jobctl, which sends JSON" ;;
    esac
    quote "$arg"
    request="$request $quoted"
done

# socat's address syntax gives \ , : ! ' " ( ) [ ] { } and space a meaning: escape them.
address=$(printf '%s\n' "$socket" | LC_ALL=C sed 's/[]\\,:!"'"'"'()[{} ]/\\&/g')

tmp=$(mktemp -d "${TMPDIR:-/tmp}/trigger_job.XXXXXX") || fail 70 "cannot create a temporary directory"
socat_pid=
trap 'rm -rf "$tmp"' EXIT
# A trapped signal interrupts `wait` (not a foreground command): stop socat, which closes the
# connection and so cancels the run, then exit 128+N.
# shellcheck disable=SC2317 # called from the traps below
cancel() { # cancel STATUS SIGNAL
    trap - HUP INT TERM
    if [ -n "$socat_pid" ]; then
        kill "$socat_pid" 2>/dev/null
        printf '%s: %s: closed the connection, which cancels the run\n' "$prog" "$2" >&2
    fi
    exit "$1"
}
trap 'cancel 129 SIGHUP' HUP
trap 'cancel 130 SIGINT' INT
trap 'cancel 143 SIGTERM' TERM

printf '%s\n' "$request" >"$tmp/request"
mkfifo "$tmp/out" "$tmp/tail" || fail 70 "cannot create FIFOs in $tmp"
# Keep only the last 64 KiB (the server's last line is in there), whatever the output's size.
tail -c 65536 <"$tmp/tail" >"$tmp/last" &
tail_pid=$!
tee "$tmp/tail" <"$tmp/out" &
tee_pid=$!
# -t: after sending the request (stdin's EOF, a half-close, which is not a cancel), wait for the
# server to close instead of socat's default 0.5 s. LC_ALL=C: its error messages are matched below.
LC_ALL=C socat -t 1000000000 STDIO "UNIX-CONNECT:$address" <"$tmp/request" >"$tmp/out" 2>"$tmp/socat.err" &
socat_pid=$!
wait "$socat_pid"
socat_status=$?
socat_pid=
wait "$tee_pid"
tee_status=$?
wait "$tail_pid"

last=$(tail -n 1 "$tmp/last")
last=${last%"$cr"}
case $last in
"jobrunner: error: "*)
    code=${last#"jobrunner: error: "}
    code=${code%%:*}
    case $code in
    bad-request | unknown-job | bad-arguments) exit 64 ;;
    forbidden) exit 77 ;;
    busy) exit 75 ;;
    config | credential) exit 78 ;;
    *) exit 70 ;;
    esac
    ;;
"jobrunner: "*" (run "*") exited with "*" after "*" s")
    status=${last##*") exited with "}
    status=${status%%" after "*}
    case $status in
    "" | *[!0-9]*) fail 70 "malformed last line from the server: $last" ;;
    esac
    [ "$status" -le 255 ] || fail 70 "malformed last line from the server: $last"
    exit "$status"
    ;;
esac

# Our stdout was closed (trigger_job.sh x | head): tee died of SIGPIPE (or failed with EPIPE when
# SIGPIPE is ignored), then socat could not write to it and closed the connection. Quietly, like jobctl.
error=$(tail -n 1 "$tmp/socat.err")
if [ "$tee_status" -gt 128 ]; then
    exit "$tee_status"
fi
case $error in
*"write(1, "*"Broken pipe"*) exit 141 ;;
esac
if [ "$socat_status" -gt 128 ]; then
    exit "$socat_status"
fi
if [ "$socat_status" -ne 0 ] && [ ! -s "$tmp/last" ]; then
    case $error in
    *"Permission denied"* | *"Operation not permitted"*)
        group=$(stat -c %G -- "$socket" 2>/dev/null || stat -f %Sg -- "$socket" 2>/dev/null)
        fail 77 "permission denied connecting to $socket" \
            "you need to be in the group that owns the socket: sudo usermod -aG ${group:-jobrunner} \$USER, then log in again"
        ;;
    *"No such file or directory"*) fail 69 "$socket does not exist" "$start_hint" ;;
    *"Connection refused"*) fail 69 "nothing is listening on $socket" "$start_hint" ;;
    *) fail 69 "cannot connect to $socket: ${error:-socat exited with $socat_status}" "$start_hint" ;;
    esac
fi
fail 255 "the connection was lost before the server's last line${error:+ ($error)}" \
    "the server's side is in the journal: journalctl -u 'job@*'"
