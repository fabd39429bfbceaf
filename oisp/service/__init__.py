"""oisp as a service: the redirector as root and the sensor as a named user, started at boot.

`units` builds the systemd units from a config (pure text, testable without root or
systemd); `systemd` writes, removes, starts and reads them; `windows` is the same split
written to the Service Control Manager and the Task Scheduler (never run here).
"""
