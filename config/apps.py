"""The admin app with Kurs's admin site (config/admin_throttle.py: the throttled sign-in).

A module of its own: INSTALLED_APPS imports it before the models exist, so it names the site by
its dotted path and imports the throttle only in `ready()`.
"""

from __future__ import annotations

from django.contrib.admin.apps import AdminConfig
from django.contrib.auth.signals import user_login_failed


class KursAdminConfig(AdminConfig):
    default_site = "config.admin_throttle.KursAdminSite"

    def ready(self) -> None:
        super().ready()
        from config.admin_throttle import record_failure

        user_login_failed.connect(record_failure, dispatch_uid="kurs-admin-login-throttle")
