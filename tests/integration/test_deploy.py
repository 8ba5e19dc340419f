#!/usr/bin/python3
"""deploy/: the systemd unit, the example /etc/pgdual/pgdual.yaml, the container image
definition and the Kubernetes manifests, checked for what can be checked without systemd
running, a container engine or a cluster: syntax (systemd-analyze verify, PyYAML,
kubectl kustomize when installed), the keys the issue asks for, and that the pieces agree
with each other and with pgdual (configs pass `pgdual --check`, ports and paths match,
the image installs the libraries the binaries link)."""

import glob
import os
import re
import shutil
import subprocess
import unittest

import yaml

import pdtest

SRC = pdtest.source_dir()
DEPLOY = os.path.join(SRC, "deploy")
UNIT = os.path.join(DEPLOY, "systemd", "pgdual.service")
ETC_CONFIG = os.path.join(DEPLOY, "pgdual.yaml")
CONTAINERFILE = os.path.join(DEPLOY, "container", "Containerfile")
K8S = os.path.join(DEPLOY, "k8s")


def read(path):
    with open(path) as f:
        return f.read()


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def check_config(text, users_file=None):
    """Runs `pgdual --check` on a config, its auth.users_file pointed at the example
    users file (the real one is on the target machine); returns (rc, output)."""
    d = pdtest.tmpdir("pdtest-deploy-")
    cfg = yaml.safe_load(text)
    if cfg.get("auth", {}).get("users_file"):
        users = os.path.join(d, "users.txt")
        shutil.copy(os.path.join(DEPLOY, "examples", "users.txt"), users)
        cfg["auth"]["users_file"] = users
    path = os.path.join(d, "pgdual.yaml")
    with open(path, "w") as f:
        f.write(pdtest.to_yaml(cfg))
    r = subprocess.run([pdtest.pgdual_path(), "-c", path, "--check"], capture_output=True,
                       text=True, timeout=30)
    return r.returncode, r.stdout + r.stderr


def under(path, folder):
    return os.path.commonpath([path, folder]) == folder


# ---------------------------------------------------------------------------------------
# systemd


def unit_entries(text):
    """[(section, key, value)] of a unit file; keys may repeat (SystemCallFilter=)."""
    out, section = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        m = re.match(r"^\[(\w+)\]$", line)
        if m:
            section = m.group(1)
            continue
        key, sep, value = line.partition("=")
        if not sep or section is None:
            raise AssertionError("not a unit file line: %r" % line)
        out.append((section, key.strip(), value.strip()))
    return out


class SystemdTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.entries = unit_entries(read(UNIT))
        cls.service = {}
        for section, key, value in cls.entries:
            if section == "Service":
                cls.service.setdefault(key, []).append(value)
        cls.config = load_yaml(ETC_CONFIG)

    def value(self, key):
        self.assertIn(key, self.service, "the unit has no %s=" % key)
        return self.service[key][-1]

    def test_required_keys(self):
        expected = {
            "Type": "notify", "NotifyAccess": "main", "User": "pgdual", "Group": "pgdual",
            "KillSignal": "SIGTERM", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
            "ProtectHome": "yes", "PrivateTmp": "yes", "RuntimeDirectory": "pgdual",
            "StateDirectory": "pgdual", "CapabilityBoundingSet": "",
            "ExecReload": "/bin/kill -HUP $MAINPID",
        }
        for key, want in expected.items():
            with self.subTest(key=key):
                self.assertEqual(self.value(key), want)
        self.assertEqual(set(self.value("RestrictAddressFamilies").split()),
                         {"AF_UNIX", "AF_INET", "AF_INET6"})
        self.assertEqual(self.value("ExecStart"),
                         "/usr/local/bin/pgdual -c /etc/pgdual/pgdual.yaml")
        self.assertIn("--check", self.value("ExecStartPre"))
        self.assertIn(("Install", "WantedBy", "multi-user.target"), self.entries)

    def test_stop_timeout_above_grace_period(self):
        grace_s = self.config["limits"]["shutdown_grace_ms"] / 1000.0
        self.assertGreater(int(self.value("TimeoutStopSec")), grace_s + 5)

    def test_config_writes_only_where_the_unit_allows(self):
        run_dir = "/run/" + self.value("RuntimeDirectory")
        state_dir = "/var/lib/" + self.value("StateDirectory")
        self.assertTrue(under(self.config["admin"]["socket"], run_dir))
        self.assertTrue(under(self.config["state"], state_dir))
        self.assertTrue(under(self.config["divergence"]["log"], state_dir))
        self.assertEqual(self.value("ConfigurationDirectory"), "pgdual")  # /etc/pgdual

    def test_etc_config_passes_check(self):
        rc, out = check_config(read(ETC_CONFIG))
        self.assertEqual(rc, 0, out)

    def test_systemd_analyze_verify(self):
        tool = shutil.which("systemd-analyze")
        if tool is None:
            self.skipTest("systemd-analyze is not installed (the key checks above still ran)")
        # verify wants the programs to exist: point the unit at the build's pgdual.
        d = pdtest.tmpdir("pdtest-unit-")
        path = os.path.join(d, "pgdual.service")
        with open(path, "w") as f:
            f.write(read(UNIT).replace("/usr/local/bin/pgdual", pdtest.pgdual_path()))
        r = subprocess.run([tool, "verify", path], capture_output=True, text=True, timeout=60)
        # Unknown keys and bad values are warnings on stderr, exit status 0: fail on any
        # line about our unit (other units of the machine may have their own complaints).
        ours = [line for line in (r.stdout + r.stderr).splitlines() if "pgdual.service" in line]
        self.assertEqual((r.returncode, ours), (0, []), r.stdout + r.stderr)


# ---------------------------------------------------------------------------------------
# The container image


def stages(text):
    """[(base image, [instruction lines])] of a Containerfile, continuations joined."""
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            out.append((rest.split()[0], []))
        else:
            out[-1][1].append((word.upper(), rest.strip()))
    return out


def apt_packages(instructions):
    pkgs = []
    for word, rest in instructions:
        if word != "RUN":
            continue
        for cmd in re.split(r"&&|;", rest):
            m = re.search(r"apt-get install (.*)", cmd)
            if m:
                pkgs += [t for t in m.group(1).split() if not t.startswith("-")]
    return pkgs


def install_deps_packages():
    m = re.search(r'^PACKAGES="(.*?)"', read(os.path.join(DEPLOY, "install-deps.sh")),
                  re.S | re.M)
    return set(m.group(1).split())


def linked_packages(binary):
    """The Debian packages holding the shared libraries a binary names (DT_NEEDED)."""
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]",
                        subprocess.run(["readelf", "-d", binary], capture_output=True,
                                       text=True, check=True).stdout)
    paths = dict(re.findall(r"^\s*(\S+) => (\S+)", subprocess.run(
        ["ldd", binary], capture_output=True, text=True, check=True).stdout, re.M))
    pkgs = set()
    for lib in needed:
        real = os.path.realpath(paths[lib])
        owner = subprocess.run(["dpkg", "-S", real], capture_output=True, text=True)
        if owner.returncode != 0:  # merged /usr: dpkg may know the /lib spelling
            owner = subprocess.run(["dpkg", "-S", real.replace("/usr/lib/", "/lib/", 1)],
                                   capture_output=True, text=True, check=True)
        pkgs.add(owner.stdout.split(":")[0])
    return pkgs


class ContainerfileTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stages = stages(read(CONTAINERFILE))

    def test_debian_12_two_stages(self):
        self.assertEqual(len(self.stages), 2)
        for base, _ in self.stages:
            self.assertRegex(base, r"^debian:12(-slim)?$")

    def test_build_stage_packages_come_from_install_deps(self):
        pkgs = apt_packages(self.stages[0][1])
        self.assertTrue(pkgs)
        self.assertEqual(set(pkgs) - install_deps_packages(), set())

    def test_runtime_stage_installs_what_the_binaries_link(self):
        pkgs = set(apt_packages(self.stages[1][1]))
        self.assertEqual({p for p in pkgs if p.endswith("-dev")}, set())
        for binary in ("pgdual", "pgdualctl"):
            with self.subTest(binary=binary):
                # The sanitizer build also links its runtimes, which the image never has.
                want = {p for p in linked_packages(os.path.join(pdtest.build_dir(), binary))
                        if p != "libc6" and not re.match(r"lib(asan|ubsan)\d", p)}
                self.assertEqual(want - pkgs, set(), "not installed in the runtime stage")

    def test_build_commands_match_the_readme(self):
        runs = " ".join(rest for word, rest in self.stages[0][1] if word == "RUN")
        readme = read(os.path.join(SRC, "README.md"))
        for cmd in ("cmake -S . -B build", "cmake --build build"):
            with self.subTest(cmd=cmd):
                self.assertIn(cmd, runs)
                self.assertIn(cmd, readme)

    def test_copies_every_source_folder_the_build_uses(self):
        cmake = read(os.path.join(SRC, "CMakeLists.txt"))
        folders = set(re.findall(r"\b([a-z]+)/\w+\.c\b", cmake))
        folders |= set(re.findall(r"add_subdirectory\((\w+)\)", cmake))
        copied = {rest.split()[0] for word, rest in self.stages[0][1] if word == "COPY"}
        self.assertEqual(folders - copied, set())
        self.assertIn("CMakeLists.txt", " ".join(copied))

    def test_runtime_user_ports_and_signal(self):
        runtime = dict(self.stages[1][1])
        self.assertNotIn(runtime["USER"].split(":")[0], ("0", "root"))
        self.assertEqual(set(runtime["EXPOSE"].split()), {"6432", "9187"})
        self.assertEqual(runtime["STOPSIGNAL"], "SIGTERM")
        self.assertIn("/usr/local/bin/pgdual", runtime["ENTRYPOINT"])


# ---------------------------------------------------------------------------------------
# Kubernetes


API_VERSIONS = {"ConfigMap": "v1", "Deployment": "apps/v1", "Service": "v1",
                "PodDisruptionBudget": "policy/v1",
                "Kustomization": "kustomize.config.k8s.io/v1beta1"}


def port_of(container, ref):
    """The containerPort a probe or Service refers to by name or number, or None."""
    for p in container.get("ports", []):
        if ref in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    return None


class KubernetesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.files = sorted(glob.glob(os.path.join(K8S, "*.yaml")))
        cls.docs = {}
        for path in cls.files:
            with open(path) as f:
                for doc in yaml.safe_load_all(f):
                    if doc is not None:
                        cls.docs.setdefault(doc["kind"], []).append((path, doc))
        cls.deploy = cls.one("Deployment")
        cls.pod = cls.deploy["spec"]["template"]
        cls.container = cls.pod["spec"]["containers"][0]
        cls.cm = cls.one("ConfigMap")
        cls.config = yaml.safe_load(cls.cm["data"]["pgdual.yaml"])

    @classmethod
    def one(cls, kind):
        docs = cls.docs.get(kind, [])
        if len(docs) != 1:
            raise AssertionError("expected one %s in deploy/k8s, found %d" % (kind, len(docs)))
        return docs[0][1]

    def test_kinds_and_api_versions(self):
        self.assertEqual(set(self.docs), set(API_VERSIONS))
        for kind, docs in self.docs.items():
            for path, doc in docs:
                with self.subTest(file=os.path.basename(path)):
                    self.assertEqual(doc["apiVersion"], API_VERSIONS[kind])
                    if kind != "Kustomization":
                        self.assertTrue(doc["metadata"]["name"])
        listed = set(self.one("Kustomization")["resources"])
        self.assertEqual(listed, {os.path.basename(p) for p in self.files} - {"kustomization.yaml"})

    def test_selectors_match_the_pod_labels(self):
        labels = self.pod["metadata"]["labels"]
        selectors = {"Deployment": self.deploy["spec"]["selector"]["matchLabels"],
                     "Service": self.one("Service")["spec"]["selector"],
                     "PodDisruptionBudget":
                         self.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]}
        for kind, sel in selectors.items():
            with self.subTest(kind=kind):
                self.assertTrue(sel)
                self.assertEqual({k: labels.get(k) for k in sel}, sel)
        self.assertGreaterEqual(self.deploy["spec"]["replicas"], 2)

    def test_ports_exist_and_match_the_config(self):
        c = self.container
        listen_port = self.config["listen"]["port"]
        metrics_port = int(self.config["admin"]["metrics"].rsplit(":", 1)[1])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            with self.subTest(probe=probe):
                self.assertEqual(port_of(c, c[probe]["httpGet"]["port"]), metrics_port)
        self.assertEqual(c["readinessProbe"]["httpGet"]["path"], "/ready")
        self.assertEqual(c["startupProbe"]["httpGet"]["path"], "/ready")
        self.assertEqual(c["livenessProbe"]["httpGet"]["path"], "/metrics")
        targets = {p["name"]: port_of(c, p["targetPort"])
                   for p in self.one("Service")["spec"]["ports"]}
        self.assertEqual(targets, {"postgres": listen_port, "metrics": metrics_port})
        # Probes come from the kubelet, not the loopback.
        self.assertEqual(self.config["listen"]["host"], "0.0.0.0")
        self.assertTrue(self.config["admin"]["metrics"].startswith("0.0.0.0:"))

    def test_termination_grace_above_pgdual_grace(self):
        grace_s = self.config["limits"]["shutdown_grace_ms"] / 1000.0
        pre_stop = self.container["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(pre_stop[0], "/bin/sleep")
        self.assertGreater(self.pod["spec"]["terminationGracePeriodSeconds"],
                           grace_s + int(pre_stop[1]))

    def test_volumes_hold_what_the_config_names(self):
        spec = self.pod["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in self.container["volumeMounts"]}
        for m in mounts.values():
            self.assertIn(m["name"], volumes)

        def mount_of(path):
            best = max((p for p in mounts if under(path, p)), key=len, default=None)
            self.assertIsNotNone(best, "%s is on no volume" % path)
            return mounts[best]

        cfg_mount = mount_of("/etc/pgdual/pgdual.yaml")
        self.assertEqual(volumes[cfg_mount["name"]]["configMap"]["name"],
                         self.cm["metadata"]["name"])
        self.assertEqual(self.container["args"], ["-c", "/etc/pgdual/pgdual.yaml"])
        self.assertIn("secret", volumes[mount_of(self.config["auth"]["users_file"])["name"]])
        # readOnlyRootFilesystem: what pgdual writes must be on a writable volume.
        self.assertTrue(self.container["securityContext"]["readOnlyRootFilesystem"])
        for path in (self.config["admin"]["socket"], self.config["divergence"]["log"]):
            with self.subTest(path=path):
                self.assertFalse(mount_of(path).get("readOnly", False))

    def test_shared_state_and_user(self):
        # Flags shared by every replica (DESIGN.md §4).
        self.assertEqual(self.config["state"], "postgres")
        uid = dict(stages(read(CONTAINERFILE))[1][1])["USER"].split(":")[0]
        self.assertEqual(str(self.pod["spec"]["securityContext"]["runAsUser"]), uid)
        self.assertTrue(self.pod["spec"]["securityContext"]["runAsNonRoot"])

    def test_embedded_config_passes_check(self):
        rc, out = check_config(self.cm["data"]["pgdual.yaml"])
        self.assertEqual(rc, 0, out)

    def test_kubectl_kustomize(self):
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            self.skipTest("kubectl is not installed (the PyYAML checks above still ran)")
        r = subprocess.run([kubectl, "kustomize", K8S], capture_output=True, text=True,
                           timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        kinds = sorted(d["kind"] for d in yaml.safe_load_all(r.stdout) if d)
        self.assertEqual(kinds, ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"])


if __name__ == "__main__":
    pdtest.main()
