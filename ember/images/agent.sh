#!/bin/sh
# Ember guest agent for `ember exec`, speaking the line protocol documented in
# ember/images/agent_protocol.py over a dedicated serial port (default
# /dev/ttyS1), or over its own stdin/stdout when the port is "-" (a vsock
# connection handed over by ember-vsock): announces "READY 0 1", then answers
# each "EXEC <id> <base64>"
# with "OUT <id> <b64 stdout>", "ERR <id> <b64 stderr>", "RC <id> <status>".
# Sourcing this file in a shell with EMBER_AGENT_LIB=1 only defines functions.

EMBER_AGENT_VERSION=1
EMBER_AGENT_BAD_REQUEST=127

# agent_b64decode TEXT: decode standard or URL-safe base64, padding optional.
agent_b64decode() {
    _s=$(printf '%s' "$1" | tr -- '-_' '+/')
    case $_s in *[!A-Za-z0-9+/=]*) return 1 ;; esac
    case $(( ${#_s} % 4 )) in
        1) return 1 ;;
        2) _s="$_s==" ;;
        3) _s="$_s=" ;;
    esac
    printf '%s' "$_s" | base64 -d
}

agent_reply() {  # KIND ID FILE: one reply line carrying FILE base64-encoded
    printf '%s %s %s\n' "$1" "$2" "$(base64 -w0 <"$3")"
}

# agent_exec ID BASE64 WORKDIR: run one request, print its three reply lines.
agent_exec() {
    if agent_b64decode "$2" >"$3/cmd" 2>/dev/null; then
        sh "$3/cmd" </dev/null >"$3/out" 2>"$3/err"
        _rc=$?
    else
        : >"$3/out"
        echo "ember-agent: request $1 is not valid base64" >"$3/err"
        _rc=$EMBER_AGENT_BAD_REQUEST
    fi
    agent_reply OUT "$1" "$3/out"
    agent_reply ERR "$1" "$3/err"
    printf 'RC %s %s\n' "$1" "$_rc"
}

# agent_serve WORKDIR: read requests on stdin, answer on stdout.
agent_serve() {
    printf 'READY 0 %s\n' "$EMBER_AGENT_VERSION"
    while IFS=' ' read -r _verb _id _payload; do
        _id=${_id%"$(printf '\r')"}
        _payload=${_payload%"$(printf '\r')"}
        case $_id in ''|*[!0-9]*) continue ;; esac
        case $_verb in
            EXEC) agent_exec "$_id" "$_payload" "$1" ;;
        esac
    done
}

agent_main() {
    _port=${1:-/dev/ttyS1}
    _work=$(mktemp -d /tmp/ember-agent.XXXXXX) || exit 1
    if [ "$_port" = - ]; then
        agent_serve "$_work"
        rm -rf "$_work"
        return
    fi
    stty -F "$_port" raw -echo 2>/dev/null
    agent_serve "$_work" <"$_port" >"$_port"
}

if [ "${EMBER_AGENT_LIB:-0}" != 1 ]; then
    agent_main "$@"
fi
