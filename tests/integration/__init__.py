"""Opt-in tests against a real A1111 WebUI (SD_WEBUI_ROOT); see docs/webui-integration-testing.md."""
