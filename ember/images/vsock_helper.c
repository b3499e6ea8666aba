/*
 * ember-vsock: AF_VSOCK stream helper for Ember's BusyBox guest (vsock(7)).
 * BusyBox has no AF_VSOCK, so this small static program fills the gap:
 *   ember-vsock -l PORT PROG [ARG...]  listen on VMADDR_CID_ANY:PORT; for each
 *                                      connection fork and run PROG with the
 *                                      socket as its stdin and stdout.
 *   ember-vsock -c CID PORT            connect to CID:PORT and relay stdin to
 *                                      the socket and the socket to stdout.
 * Built at rootfs build time with the host gcc (gcc -static -Os).
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BACKLOG 16
#define RELAY_BUF 65536

static int usage(void)
{
	fprintf(stderr, "usage: ember-vsock -l PORT PROG [ARG...] | -c CID PORT\n");
	return 2;
}

static int parse_u32(const char *text, unsigned int *out)
{
	char *end;
	unsigned long value;

	errno = 0;
	value = strtoul(text, &end, 10);
	if (errno || *text == '\0' || *end != '\0' || value > 0xffffffffUL)
		return -1;
	*out = (unsigned int)value;
	return 0;
}

static void vsock_addr(struct sockaddr_vm *addr, unsigned int cid, unsigned int port)
{
	memset(addr, 0, sizeof(*addr));
	addr->svm_family = AF_VSOCK;
	addr->svm_cid = cid;
	addr->svm_port = port;
}

static void serve_one(int conn, char **argv)
{
	signal(SIGCHLD, SIG_DFL); /* an ignored SIGCHLD survives exec and hides exit statuses */
	if (dup2(conn, 0) < 0 || dup2(conn, 1) < 0)
		_exit(126);
	if (conn > 1)
		close(conn);
	execv(argv[0], argv);
	perror("ember-vsock: exec");
	_exit(127);
}

static int listen_mode(unsigned int port, char **argv)
{
	struct sockaddr_vm addr;
	int server = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);

	vsock_addr(&addr, VMADDR_CID_ANY, port);
	if (server < 0 || bind(server, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
	    listen(server, BACKLOG) < 0) {
		perror("ember-vsock: listen");
		return 1;
	}
	signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
	for (;;) {
		int conn = accept(server, NULL, NULL);

		if (conn < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			perror("ember-vsock: accept");
			return 1;
		}
		if (fork() == 0) {
			close(server);
			serve_one(conn, argv);
		}
		close(conn);
	}
}

/* Copy what is readable on `from` to `to`; returns bytes moved, 0 on EOF, -1 on error. */
static ssize_t relay(int from, int to)
{
	static char buf[RELAY_BUF];
	ssize_t n = read(from, buf, sizeof(buf));

	for (ssize_t done = 0; n > 0 && done < n;) {
		ssize_t w = write(to, buf + done, n - done);

		if (w < 0)
			return -1;
		done += w;
	}
	return n;
}

static int connect_mode(unsigned int cid, unsigned int port)
{
	struct sockaddr_vm addr;
	struct pollfd fds[2] = {{.fd = 0, .events = POLLIN}, {.events = POLLIN}};
	int sock = socket(AF_VSOCK, SOCK_STREAM, 0);

	vsock_addr(&addr, cid, port);
	if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("ember-vsock: connect");
		return 1;
	}
	fds[1].fd = sock;
	for (;;) {
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		if (fds[0].revents && relay(0, sock) <= 0) {
			shutdown(sock, SHUT_WR); /* stdin done: half-close, keep reading */
			fds[0].fd = -1;
		}
		if (fds[1].revents) {
			ssize_t n = relay(sock, 1);

			if (n <= 0)
				return n < 0;
		}
	}
}

int main(int argc, char **argv)
{
	unsigned int a, b;

	if (argc >= 4 && strcmp(argv[1], "-l") == 0 && parse_u32(argv[2], &a) == 0)
		return listen_mode(a, argv + 3);
	if (argc == 4 && strcmp(argv[1], "-c") == 0 && parse_u32(argv[2], &a) == 0 &&
	    parse_u32(argv[3], &b) == 0)
		return connect_mode(a, b);
	return usage();
}
