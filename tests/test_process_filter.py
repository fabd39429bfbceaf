"""`--process`/`--exclude`: one rule (pid or name, names without case) for record's
include/exclude lists and for capture's and flows' per-packet matcher."""

from oisp.capture.session import ProcessMatcher
from oisp.divert.process_filter import ProcessFilter


def test_process_filter_rules():
    everyone = ProcessFilter()
    assert not everyone.active
    assert everyone.allows(None, None)
    only = ProcessFilter(include="python,node")
    assert only.allows(1, "Python")
    assert only.allows(2, "node")
    assert not only.allows(3, "chrome")
    assert not only.allows(None, None)  # unknown owner: not in the include list
    but_not = ProcessFilter(include="python", exclude=["42"])
    assert but_not.allows(41, "python")
    assert not but_not.allows(42, "python")
    no_chrome = ProcessFilter(exclude="chrome, 7")
    assert no_chrome.allows(None, None)
    assert not no_chrome.allows(5, "chrome")
    assert not no_chrome.allows(7, "x")


class Names:
    """pid → name, counting the lookups (each costs a psutil call in the real one)."""

    def __init__(self, names: dict[int, str]):
        self.names = names
        self.asked: list[int] = []

    def __call__(self, pid: int) -> str | None:
        self.asked.append(pid)
        return self.names.get(pid)


def test_matcher_by_name_follows_the_filters_rule_and_asks_each_pid_once():
    names = Names({10: "Python.exe", 11: "curl", 12: "python.exe"})
    matcher = ProcessMatcher("python.exe", names)
    assert list(matcher.mask([10, 11, 12, 10, 0, 13])) == [True, False, True, True, False, False]
    assert sorted(names.asked) == [10, 11, 12, 13]  # pid 0 (unknown) is never looked up


def test_matcher_by_pid_needs_no_names():
    names = Names({10: "python"})
    matcher = ProcessMatcher("11", names)
    assert list(matcher.mask([10, 11, 0])) == [False, True, False]
    assert names.asked == []
