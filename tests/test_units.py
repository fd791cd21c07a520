"""runner/units.py: the units of each job, made from jobs.toml and units/job-NAME@.service.in.

Each job's units must load its credentials and no other, and carry its sandbox; nothing here needs
systemd (tests/e2e checks that systemd applies them).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runner import units
from runner.config import Config, parse_config

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "units" / "job-NAME@.service.in"
# Written out here, not imported: the paths and names that install.sh, the docs and systemd depend on.
MISSING_MARK = "jobrunner:credential-file-missing"  # runner/credentials.py's UNAVAILABLE
SOCKET_INSTALL = "/etc/systemd/system/job.socket.d/10-install.conf"
JOB_UNITS = "/etc/jobrunner/job-units.conf"

JOBS = {
    "plain": {"command": ["/bin/true"]},
    "build": {
        "command": ["bin/build"],
        "credentials": ["a", "b"],
        "env": {"KEY": "credential:a"},
        "network": "none",
        "memory_max": "2G",
        "tasks_max": 128,
        "jit": True,
    },
    "fetch": {
        "command": ["bin/fetch"],
        "credentials": ["fetch.token"],
        "network": ["192.0.2.0/24", "2001:db8::1"],
    },
}


@pytest.fixture
def config() -> Config:
    return parse_config({"runner": {"project": "/srv/project"}, "jobs": JOBS}, "/etc/jobrunner/jobs.toml")


@pytest.fixture
def template() -> str:
    return TEMPLATE.read_text()


def rendered(config: Config, template: str, root: Path) -> dict[str, units.Unit]:
    found = {unit.path: unit for unit in units.render(config, template, str(root))}
    assert len(found) == len(units.render(config, template, str(root))), "no path is written twice"
    return found


def text(files: dict[str, units.Unit], path: str) -> str:
    unit = files[path]
    assert unit.link is None and unit.text is not None, unit
    return unit.text


def settings(unit_text: str, key: str) -> list[str]:
    """The values of `KEY=` lines, in order."""
    return [line.removeprefix(f"{key}=") for line in unit_text.splitlines() if line.startswith(f"{key}=")]


def of_job(files: dict[str, units.Unit], job: str) -> dict[str, units.Unit]:
    prefixes = (f"job-{job}.socket", f"job-{job}@.service", f"job@{job}.service")
    return {
        path: unit
        for path, unit in files.items()
        if path.startswith(prefixes) or path == f"sockets.target.wants/job-{job}.socket"
    }


# ------------------------------------------------------------------------------------------- the files


def test_the_template_is_found_beside_the_code() -> None:
    assert Path(units.template_path()) == TEMPLATE
    assert TEMPLATE.is_file()


def test_unit_names() -> None:
    assert units.unit_names("build") == ("job-build.socket", "job-build@.service", "job@build.service")


def test_each_job_gets_its_units_and_nothing_is_linked_that_is_not_there(
    config: Config, template: str, tmp_path: Path
) -> None:
    files = rendered(config, template, tmp_path)  # an empty root: no install.sh files, no drop-ins

    expected = set()
    for job in JOBS:
        expected |= {
            f"job-{job}.socket",
            f"job-{job}@.service",
            f"job@{job}.service",
            f"job-{job}@.service.d/30-job-profile.conf",
            f"job@{job}.service.d/30-job-profile.conf",
            f"sockets.target.wants/job-{job}.socket",
        }
    assert set(files) == expected
    links = {path: unit.link for path, unit in files.items() if unit.link is not None}
    assert links == {f"sockets.target.wants/job-{job}.socket": f"../job-{job}.socket" for job in JOBS}


def test_install_sh_files_are_linked_in_when_they_exist(
    config: Config, template: str, tmp_path: Path
) -> None:
    for path in (SOCKET_INSTALL, JOB_UNITS):
        (tmp_path / path.lstrip("/")).parent.mkdir(parents=True)
        (tmp_path / path.lstrip("/")).write_text("[Service]\n")

    files = rendered(config, template, tmp_path)

    for job in JOBS:
        # Links to the real paths, not to where the test's root has them.
        assert files[f"job-{job}.socket.d/10-install.conf"].link == SOCKET_INSTALL
        assert files[f"job-{job}@.service.d/10-job-units.conf"].link == JOB_UNITS
        assert files[f"job@{job}.service.d/10-job-units.conf"].link == JOB_UNITS
    assert not [unit for unit in files.values() if unit.link and str(tmp_path) in unit.link]


def test_only_the_install_sh_files_that_exist_are_linked(
    config: Config, template: str, tmp_path: Path
) -> None:
    (tmp_path / "etc/jobrunner").mkdir(parents=True)
    (tmp_path / JOB_UNITS.lstrip("/")).write_text("[Service]\n")

    files = rendered(config, template, tmp_path)

    assert files["job-build@.service.d/10-job-units.conf"].link == JOB_UNITS
    assert not [path for path in files if path.endswith("10-install.conf")]


def test_an_administrators_drop_ins_for_a_job_reach_its_operator_unit(
    config: Config, template: str, tmp_path: Path
) -> None:
    admin = tmp_path / "etc/systemd/system/job-build@.service.d"
    admin.mkdir(parents=True)
    for name in ("50-proc.conf", "20-env.conf", "notes.txt", "99-off.conf.disabled"):
        (admin / name).write_text("[Service]\n")
    (tmp_path / "etc/systemd/system/job-other@.service.d").mkdir()
    (tmp_path / "etc/systemd/system/job-other@.service.d/50-x.conf").write_text("[Service]\n")

    files = rendered(config, template, tmp_path)

    linked = {path: unit.link for path, unit in files.items() if unit.link and "/job-build@" in unit.link}
    # systemd applies them to job-build@N.service itself; job@build.service is another unit name.
    assert linked == {
        "job@build.service.d/20-env.conf": "/etc/systemd/system/job-build@.service.d/20-env.conf",
        "job@build.service.d/50-proc.conf": "/etc/systemd/system/job-build@.service.d/50-proc.conf",
    }
    for job in ("plain", "fetch"):
        assert not [
            path for path in of_job(files, job) if path.endswith(("-env.conf", "-proc.conf", "-x.conf"))
        ]


def test_write_puts_files_and_links_in_the_directory(config: Config, template: str, tmp_path: Path) -> None:
    out = tmp_path / "generator.normal"
    out.mkdir()
    root = tmp_path / "root"
    (root / "etc/jobrunner").mkdir(parents=True)
    (root / JOB_UNITS.lstrip("/")).write_text("[Service]\n")
    files = units.render(config, template, str(root))

    units.write(files, str(out))

    for unit in files:
        path = out / unit.path
        if unit.link is not None:
            assert path.is_symlink()
            assert os.readlink(path) == unit.link
        else:
            assert not path.is_symlink()
            assert path.read_text() == unit.text
    assert (out / "sockets.target.wants/job-build.socket").resolve() == out / "job-build.socket"
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() or p.is_symlink()}
    assert written == {unit.path for unit in files}


# ----------------------------------------------------------------------------------------- the service


def test_the_template_is_filled_in_for_each_job(config: Config, template: str, tmp_path: Path) -> None:
    assert "@JOB@" in template
    files = rendered(config, template, tmp_path)

    for job in JOBS:
        service = text(files, f"job-{job}@.service")
        assert "@JOB@" not in service
        (exec_start,) = settings(service, "ExecStart")
        assert exec_start.endswith(f'runner.__main__.run()" {job}')
        assert settings(service, "Description") == [f"jobrunner: run %i of job {job}"]
        assert f"[jobs.{job}] in /etc/jobrunner/jobs.toml" in service.splitlines()[0]
        # The template's text after the generated header, with only the job's name filled in.
        assert service.endswith(template.replace("@JOB@", job))


def test_the_operator_unit_is_the_same_text_as_the_socket_template(
    config: Config, template: str, tmp_path: Path
) -> None:
    files = rendered(config, template, tmp_path)

    for job in JOBS:
        assert text(files, f"job@{job}.service") == text(files, f"job-{job}@.service")
        assert text(files, f"job@{job}.service.d/30-job-profile.conf") == text(
            files, f"job-{job}@.service.d/30-job-profile.conf"
        )


def test_the_template_loads_no_credential_and_keeps_its_sandbox(template: str) -> None:
    for key in ("LoadCredential", "LoadCredentialEncrypted", "SetCredential", "ImportCredential"):
        assert settings(template, key) == [], key
    assert settings(template, "IPAddressDeny") == ["any"]
    assert settings(template, "MemoryDenyWriteExecute") == ["yes"]
    assert settings(template, "PrivateNetwork") == []


# ------------------------------------------------------------------------------------------ the profile


def profile_of(config: Config, template: str, root: Path, job: str) -> str:
    return text(rendered(config, template, root), f"job-{job}@.service.d/30-job-profile.conf")


def test_a_job_without_credentials_loads_none(config: Config, template: str, tmp_path: Path) -> None:
    files = of_job(rendered(config, template, tmp_path), "plain")

    for unit in files.values():
        if unit.text is not None:
            for key in ("LoadCredentialEncrypted", "LoadCredential", "SetCredential", "ImportCredential"):
                assert settings(unit.text, key) == [], (unit.path, key)
    assert "[Service]" in profile_of(config, template, tmp_path, "plain")


def test_a_job_loads_exactly_its_own_credentials(config: Config, template: str, tmp_path: Path) -> None:
    files = of_job(rendered(config, template, tmp_path), "build")
    loaded: list[str] = []
    fallback: list[str] = []
    for unit in files.values():
        if unit.text is not None:
            loaded += settings(unit.text, "LoadCredentialEncrypted")
            fallback += settings(unit.text, "SetCredential")
            assert settings(unit.text, "LoadCredential") == []
            assert settings(unit.text, "ImportCredential") == []
            assert "fetch.token" not in unit.text, "nothing of job fetch's credentials"

    # Once in each of its two services' profiles.
    assert loaded == 2 * ["a:/etc/credstore.encrypted/a", "b:/etc/credstore.encrypted/b"]
    assert fallback == 2 * [f"a:{MISSING_MARK}", f"b:{MISSING_MARK}"]
    profile = profile_of(config, template, tmp_path, "build")
    lines = profile.splitlines()
    # The fallback for each follows its LoadCredentialEncrypted=, in the [Service] section.
    assert lines.index("[Service]") < lines.index("LoadCredentialEncrypted=a:/etc/credstore.encrypted/a")
    assert lines.index("SetCredential=a:" + MISSING_MARK) == 1 + lines.index(
        "LoadCredentialEncrypted=a:/etc/credstore.encrypted/a"
    )

    fetch = profile_of(config, template, tmp_path, "fetch")
    assert settings(fetch, "LoadCredentialEncrypted") == ["fetch.token:/etc/credstore.encrypted/fetch.token"]
    assert settings(fetch, "SetCredential") == [f"fetch.token:{MISSING_MARK}"]


def test_network_none(config: Config, template: str, tmp_path: Path) -> None:
    profile = profile_of(config, template, tmp_path, "build")

    assert settings(profile, "PrivateNetwork") == ["yes"]
    # An empty assignment first: it resets the template's list, which the next one would only narrow.
    assert settings(profile, "RestrictAddressFamilies") == ["", "AF_UNIX"]
    assert settings(profile, "IPAddressAllow") == [""]  # the template's allow-list is gone too


def test_a_network_list(config: Config, template: str, tmp_path: Path) -> None:
    profile = profile_of(config, template, tmp_path, "fetch")

    # Reset, then only these: the template's IPAddressAllow= lines would add to them otherwise.
    assert settings(profile, "IPAddressAllow") == ["", "192.0.2.0/24 2001:db8::1/128"]
    assert settings(profile, "PrivateNetwork") == []
    assert settings(profile, "RestrictAddressFamilies") == []


def test_network_any_keeps_the_templates_network(config: Config, template: str, tmp_path: Path) -> None:
    profile = profile_of(config, template, tmp_path, "plain")

    for key in ("IPAddressAllow", "IPAddressDeny", "PrivateNetwork", "RestrictAddressFamilies"):
        assert settings(profile, key) == [], key


def test_limits_and_jit(config: Config, template: str, tmp_path: Path) -> None:
    build = profile_of(config, template, tmp_path, "build")
    assert settings(build, "MemoryMax") == ["2G"]
    assert settings(build, "TasksMax") == ["128"]
    assert settings(build, "MemoryDenyWriteExecute") == ["no"]

    plain = profile_of(config, template, tmp_path, "plain")  # install.sh's defaults apply
    for key in ("MemoryMax", "TasksMax", "MemoryDenyWriteExecute"):
        assert settings(plain, key) == [], key


def test_the_profile_is_one_service_section(config: Config, template: str, tmp_path: Path) -> None:
    for job in JOBS:
        lines = profile_of(config, template, tmp_path, job).splitlines()
        sections = [line for line in lines if line.startswith("[")]
        assert sections == ["[Service]"]
        for line in lines:
            assert not line or line.startswith(("#", "[")) or "=" in line, line


# ------------------------------------------------------------------------------------------- the socket


def test_the_socket_listens_at_the_jobs_path(
    config: Config, template: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "JOBRUNNER_JOB_SOCKETS", str(tmp_path / "elsewhere")
    )  # the tests' knob, not the unit's
    files = rendered(config, template, tmp_path)

    for job in JOBS:
        socket = text(files, f"job-{job}.socket")
        assert settings(socket, "ListenStream") == [f"/run/job/{job}.sock"]
        assert settings(socket, "Accept") == ["yes"]
        assert settings(socket, "WantedBy") == ["sockets.target"]
        assert settings(socket, "SocketMode") == ["0660"]
        assert settings(socket, "LoadCredentialEncrypted") == []


def test_an_administrators_drop_in_named_like_ours_wins_in_the_operators_unit(tmp_path: Path) -> None:
    # systemd lets /etc/systemd/system/job-NAME@.service.d/30-job-profile.conf win over the generated one
    # for socket runs; the generator does the same for job@NAME.service instead of failing to write it.
    admin = tmp_path / "etc/systemd/system/job-clash@.service.d"
    admin.mkdir(parents=True)
    (admin / units.PROFILE_DROPIN).write_text("[Service]\nTasksMax=3\n")
    config = parse_config(
        {"runner": {"project": "/srv/p"}, "jobs": {"clash": {"command": ["/bin/true"]}}}, "x"
    )
    files = units.render(config, "[Service]\nExecStart=/bin/true\n", str(tmp_path))
    same = [f for f in files if f.path == f"job@clash.service.d/{units.PROFILE_DROPIN}"]
    assert (
        len(same) == 1 and same[0].link == f"/etc/systemd/system/job-clash@.service.d/{units.PROFILE_DROPIN}"
    )
    out = tmp_path / "out"
    units.write(files, str(out))  # no FileExistsError
    assert (out / f"job-clash@.service.d/{units.PROFILE_DROPIN}").read_text().startswith("# Generated")


# ---------------------------------------------------------------------------------------------- APIs

API_TEMPLATE = REPO / "units" / "jobrunner-api-NAME@.service.in"
API_JOBS = {
    "summarize": {"command": ["bin/summarize"], "apis": ["llm"], "network": "none"},
    "crawl": {"command": ["bin/crawl"], "apis": ["llm", "search"], "network": ["192.0.2.10"]},
    "web": {"command": ["bin/web"], "apis": ["search"]},
    "plain": {"command": ["/bin/true"]},
}
APIS = {
    "llm": {"url": "https://api.example.com", "credential": "llm-key"},
    "search": {"url": "https://search.example.com/v2", "credential": "search.token", "header": "X-Key"},
}


@pytest.fixture
def api_config() -> Config:
    data = {"runner": {"project": "/srv/project"}, "jobs": API_JOBS, "apis": APIS}
    return parse_config(data, "/etc/jobrunner/jobs.toml")


def rendered_apis(config: Config, template: str, root: Path) -> dict[str, units.Unit]:
    files = units.render(config, template, str(root), api_template=API_TEMPLATE.read_text())
    return {unit.path: unit for unit in files}


def test_each_api_gets_a_socket_and_a_proxy_named_after_it(
    api_config: Config, template: str, tmp_path: Path
) -> None:
    files = rendered_apis(api_config, template, tmp_path)

    socket = text(files, "jobrunner-api-llm.socket")
    assert settings(socket, "ListenStream") == ["/run/jobrunner-api/llm.sock"]
    assert settings(socket, "Accept") == ["yes"]
    assert settings(socket, "DirectoryMode") == ["0700"]  # only root enters; jobs get it bound in
    assert settings(socket, "SocketMode") == ["0666"]
    assert "jobs: summarize, crawl" in socket
    assert files["sockets.target.wants/jobrunner-api-llm.socket"].link == "../jobrunner-api-llm.socket"
    proxy = text(files, "jobrunner-api-llm@.service")
    assert "@API@" not in proxy
    assert settings(proxy, "ExecStart") == [
        '/usr/bin/python3 -P -S -c "import runner.apiproxy; runner.apiproxy.main()" llm'
    ]
    assert settings(proxy, "DynamicUser") == ["yes"]


def test_the_proxy_alone_loads_the_apis_key(api_config: Config, template: str, tmp_path: Path) -> None:
    files = rendered_apis(api_config, template, tmp_path)

    profile = text(files, "jobrunner-api-search@.service.d/30-api-profile.conf")
    assert settings(profile, "LoadCredentialEncrypted") == [
        "search.token:/etc/credstore.encrypted/search.token"
    ]
    assert settings(profile, "SetCredential") == [f"search.token:{MISSING_MARK}"]
    assert settings(profile, "User") == ["jobrunner-api-search"]
    for path, unit in files.items():
        if path.startswith(("job-", "job@")) and unit.text is not None:
            for key in ("llm-key", "search.token"):
                assert key not in unit.text, (path, key)


def test_a_job_binds_in_the_sockets_of_the_apis_it_lists_and_no_other(
    api_config: Config, template: str, tmp_path: Path
) -> None:
    files = rendered_apis(api_config, template, tmp_path)

    def binds(job: str) -> list[str]:
        return settings(text(files, f"job-{job}@.service.d/30-job-profile.conf"), "BindReadOnlyPaths")

    assert binds("summarize") == ["/run/jobrunner-api/llm.sock:/tmp/.jobrunner-api/llm.sock"]
    assert binds("crawl") == [
        "/run/jobrunner-api/llm.sock:/tmp/.jobrunner-api/llm.sock",
        "/run/jobrunner-api/search.sock:/tmp/.jobrunner-api/search.sock",
    ]
    assert binds("plain") == []
    crawl = text(files, "job@crawl.service.d/30-job-profile.conf")  # the operator's unit too
    assert settings(crawl, "Requires") == ["jobrunner-api-llm.socket jobrunner-api-search.socket"]
    assert settings(crawl, "After") == ["jobrunner-api-llm.socket jobrunner-api-search.socket"]


def test_a_job_with_apis_may_reach_its_endpoint_whatever_its_network(
    api_config: Config, template: str, tmp_path: Path
) -> None:
    files = rendered_apis(api_config, template, tmp_path)

    def profile(job: str) -> str:
        return text(files, f"job-{job}@.service.d/30-job-profile.conf")

    # network = "none": its own loopback, on which the runner listens (AF_INET for that alone).
    assert settings(profile("summarize"), "RestrictAddressFamilies") == ["", "AF_UNIX AF_INET"]
    assert settings(profile("summarize"), "IPAddressAllow") == ["", "127.0.0.1"]
    assert settings(profile("summarize"), "PrivateNetwork") == ["yes"]
    # An address list: 127.0.0.1 as well (the kernel connects from it).
    assert settings(profile("crawl"), "IPAddressAllow") == ["", "192.0.2.10/32", "127.0.0.1"]
    # The template's allow-list already holds 127.0.0.0/8.
    assert settings(profile("web"), "IPAddressAllow") == []


def test_each_job_runs_as_a_user_of_its_own(api_config: Config, template: str, tmp_path: Path) -> None:
    files = rendered_apis(api_config, template, tmp_path)

    for job in API_JOBS:
        for unit in (f"job-{job}@.service", f"job@{job}.service"):
            assert settings(text(files, f"{unit}.d/30-job-profile.conf"), "User") == [f"job-{job}"]
    assert settings(template, "User") == []  # none shared in the template
    assert settings(template, "SupplementaryGroups") == ["jobrunner-jobs"]  # the lock directory's group


def test_user_names_fit_what_systemd_accepts_and_stay_apart() -> None:
    short = units.job_user("build")
    assert short == "job-build"
    long_a = units.job_user("a" * 64)
    long_b = units.job_user("a" * 63 + "b")
    assert len(long_a) == len(long_b) == 31
    assert long_a != long_b
    assert long_a == units.job_user("a" * 64)  # the same name every time: one user per job
    assert units.user_name("jobrunner-api-", "x" * 32).startswith("jobrunner-api-x")
    assert len(units.user_name("jobrunner-api-", "x" * 32)) == 31
    # A job named like the front door's user cannot become it.
    assert units.job_user("dispatch") != "jobrunner-dispatch"


def test_the_generator_writes_the_api_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runner import generator

    config = tmp_path / "jobs.toml"
    config.write_text(
        '[runner]\nproject = "/srv/p"\n[apis.llm]\nurl = "https://x"\ncredential = "k"\n'
        '[jobs.j]\ncommand = ["/bin/true"]\napis = ["llm"]\n'
    )
    monkeypatch.setenv("JOBRUNNER_CONFIG", str(config))
    out = tmp_path / "out"

    assert generator.main(["generator", str(out)]) == 0
    assert (out / "jobrunner-api-llm.socket").is_file()
    assert (out / "jobrunner-api-llm@.service").is_file()
    assert (
        "BindReadOnlyPaths=/run/jobrunner-api/llm.sock"
        in (out / "job-j@.service.d/30-job-profile.conf").read_text()
    )
