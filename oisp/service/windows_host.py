"""The redirector's Windows service host (pywin32's ServiceFramework). NEVER RUN HERE.

pythonservice.exe loads this class when the Service Control Manager starts
`oisp-redirector`; it runs the command `oisp service install` stored as the service's
custom option "command" (`python -I -m oisp redirector --config FILE`) as a child and
reports it running. A stop request ends the child: WinDivert's handles close with their
process, so traffic flows directly again at once (the fail-open Linux needs the
guardian for). The child exiting by itself stops the service with its exit code, and
the SCM's recovery settings decide about a restart.
"""

from __future__ import annotations

import subprocess

import servicemanager
import win32event
import win32service
import win32serviceutil

from oisp.service.windows import SERVICE


class RedirectorService(win32serviceutil.ServiceFramework):
    _svc_name_ = SERVICE
    _svc_display_name_ = "oisp redirector"

    def __init__(self, args):
        super().__init__(args)
        self.stop_event = win32event.CreateEvent(None, 0, 0, None)
        self.child: subprocess.Popen | None = None

    def SvcStop(self):  # noqa: N802 - pywin32 calls it by this name
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)
        win32event.SetEvent(self.stop_event)

    def SvcDoRun(self):  # noqa: N802 - pywin32 calls it by this name
        command = win32serviceutil.GetServiceCustomOption(SERVICE, "command")
        self.child = subprocess.Popen(command, creationflags=subprocess.CREATE_NEW_PROCESS_GROUP)
        servicemanager.LogInfoMsg(f"{SERVICE}: started pid {self.child.pid}")
        while win32event.WaitForSingleObject(self.stop_event, 1000) == win32event.WAIT_TIMEOUT:
            if self.child.poll() is not None:
                servicemanager.LogErrorMsg(f"{SERVICE}: the redirector exited with {self.child.returncode}")
                self.ReportServiceStatus(win32service.SERVICE_STOPPED, win32ExitCode=1,
                                         svcExitCode=self.child.returncode)
                return
        self.child.terminate()  # TerminateProcess: its handles close, traffic flows directly
        self.child.wait()
