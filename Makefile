# Two entry points for a fresh Debian 12 machine, as root; both are safe to re-run.
#   make demo   install what is needed, then run examples/demo.yaml on a 3-node lab inside the namespace mesh-demo
#   make test   install what is needed (with the test extras), then run the whole test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
MESH := $(VENV)/bin/mesh
APT_PACKAGES := iproute2 nftables bind9-dnsutils curl procps util-linux python3 python3-venv etcd-server
export PYTHONSAFEPATH := 1

.PHONY: deps venv demo test demo-down clean

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  if echo "$$missing" | grep -qw etcd-server; then \
	    systemctl disable --now etcd >/dev/null 2>&1 || true; \
	  fi; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

demo: venv
	$(MESH) down --host-netns mesh-demo >/dev/null 2>&1 || true
	$(MESH) up -f examples/demo.yaml --nodes 3 --host-netns mesh-demo
	@echo
	$(MESH) node ls --host-netns mesh-demo
	@echo
	$(MESH) service ls --host-netns mesh-demo
	@echo
	@echo "# curl the published port on every node, from the host namespace (mesh-demo):"
	@for a in $$($(MESH) node ls --json --host-netns mesh-demo | $(PY) -c 'import json,sys; print(" ".join(n["address"] for n in json.load(sys.stdin)))'); do \
	  echo "curl http://$$a:8080/ -> $$(ip netns exec mesh-demo curl -s --max-time 5 --retry 5 --retry-connrefused --retry-delay 1 http://$$a:8080/)"; \
	done
	@echo "# names inside a task, through the embedded resolver at 127.0.0.11 (tasks on other nodes too):"
	$(MESH) exec api.1 --host-netns mesh-demo -- getent hosts web backend db web.2
	$(MESH) exec api.1 --host-netns mesh-demo -- dig +short @127.0.0.11 tasks.web
	@echo "# the service name is a virtual IP, balanced in the kernel, from a task on every node:"
	@for n in n1 n2 n3; do echo "agent.$$n: curl http://web/ -> $$($(MESH) exec agent.$$n --host-netns mesh-demo -- curl -s --max-time 5 http://web/)"; done
	@echo
	@echo "The demo keeps running. Try: $(MESH) ps --host-netns mesh-demo"
	@echo "Remove it with:              $(MESH) down --host-netns mesh-demo"

demo-down: venv
	$(MESH) down --host-netns mesh-demo

test: venv
	$(PY) -m pytest -q tests
	@if $(PY) tests/vm/run.py --need-vm; then $(MAKE) --no-print-directory test-vm; fi

clean:
	rm -rf $(VENV) build *.egg-info

# make bench-dns   our DNS resolver vs dnsmasq, side by side on loopback (~90 s; BENCH_ARGS=--quick: ~30 s)
BENCH_APT := dnsperf dnsmasq-base
.PHONY: bench-dns
bench-dns: venv
	@missing=$$(for p in $(BENCH_APT); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-cache show $$missing >/dev/null 2>&1 || apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	PYTHONSAFEPATH=1 $(PY) bench/dns/run.py $(BENCH_ARGS)

# make vm-assets   install QEMU, busybox-static, kmod and ipvsadm if missing, then build (once) and cache
#                  the VM's boot assets: a stock Debian kernel, its modules, vmlinux and an initramfs,
#                  in /var/cache/mesh-vm (or $MESH_VM_CACHE / $XDG_CACHE_HOME/mesh-vm), never in the repo
# make test-vm     run VM_TESTS with pytest inside a QEMU VM booting that kernel (it has 802.1Q and
#                  IPVS, this machine's may not); see tests/vm/run.py. VM_ARGS: harness options, e.g.
#                  VM_ARGS='--timeout 900 --keep-log --junitxml build/vm-junit.xml'
VM_APT := qemu-system-x86 busybox-static kmod ipvsadm
VM_TESTS ?= tests/kernel/test_modes.py::test_macvlan_on_a_vlan_sub_interface_made_on_demand tests/kernel/test_lb_backends.py \
	tests/kernel/test_lb.py::test_the_routing_mesh_on_the_ipvs_backend
VM_ARGS ?=
.PHONY: vm-assets test-vm
vm-assets:
	@missing=$$(for p in $(VM_APT); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ] || ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then \
	  apt-get update -qq; \
	fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	python3 tests/vm/run.py --build-only

test-vm: venv vm-assets
	$(PY) tests/vm/run.py $(VM_ARGS) -- $(VM_TESTS)

# make bench-converge   the etcd cluster (separate manager and agent processes) following a change,
#                       side by side with the one-daemon lab: scale to 10, node death, store round
#                       trips per change (~1 min; bench/converge/README.md). BENCH_ARGS: run.py options
.PHONY: bench-converge
bench-converge: venv
	PYTHONSAFEPATH=1 $(PY) bench/converge/run.py $(BENCH_ARGS)

# make bench-lb    the kernel load balancer side by side with its anchors (~5 min; bench/lb/README.md):
#                  programming time of nftables vs kube-proxy-style iptables-restore (1k/10k services),
#                  wrk through the routing mesh of a 3-node lab vs straight to the tasks vs haproxy.
#                  Installs iptables, wrk and haproxy if missing. BENCH_LB_ARGS=--quick: a ~2 min smoke run
BENCH_LB_APT := iptables wrk haproxy curl
.PHONY: bench-lb
bench-lb: venv
	@missing=$$(for p in $(BENCH_LB_APT); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-cache show $$missing >/dev/null 2>&1 || apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  if echo "$$missing" | grep -qw haproxy; then \
	    systemctl disable --now haproxy >/dev/null 2>&1 || true; \
	  fi; \
	fi
	PYTHONSAFEPATH=1 $(PY) bench/lb/run.py $(BENCH_LB_ARGS)
