/*
 * The native VMM floor for the VM-exit round trip: a C KVM_RUN loop.
 * Runs the same real-mode micro-guest as benchmarks/exits.py (N "out dx, al"
 * to port 0xF0, then hlt) and prints "exits=N ns=T" for the loop in KVM_RUN.
 * KVM API: Documentation/virt/kvm/api.rst (KVM_CREATE_VM, KVM_RUN, kvm_run).
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE 0x10000
#define LOAD_ADDR 0x1000
#define PORT 0xF0

static void die(const char *what) { perror(what); exit(1); }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

int main(int argc, char **argv) {
    uint32_t n = argc > 1 ? (uint32_t)strtoul(argv[1], NULL, 0) : 10000;
    /* mov ecx, n; mov dx, 0xF0; top: out dx, al; dec ecx; jnz top; hlt */
    uint8_t code[] = {0x66, 0xB9, 0, 0, 0, 0, 0xBA, PORT, 0x00, 0xEE, 0x66, 0x49, 0x75, 0xFB, 0xF4};
    memcpy(code + 2, &n, 4);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    memcpy(mem + LOAD_ADDR, code, sizeof code);
    struct kvm_userspace_memory_region region = {.slot = 0, .guest_phys_addr = 0,
                                                 .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    sregs.cs.base = 0; sregs.cs.selector = 0;
    sregs.ds.base = 0; sregs.ds.selector = 0;
    sregs.ss.base = 0; sregs.ss.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = LOAD_ADDR, .rsp = 0x8000, .rflags = 0x2};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
    uint64_t exits = 0, start = now_ns();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        if (run->exit_reason == KVM_EXIT_IO && run->io.port == PORT) { exits++; continue; }
        if (run->exit_reason == KVM_EXIT_HLT) break;
        fprintf(stderr, "unexpected exit reason %u\n", run->exit_reason);
        return 1;
    }
    printf("exits=%llu ns=%llu\n", (unsigned long long)exits, (unsigned long long)(now_ns() - start));
    return exits == n ? 0 : 1;
}
