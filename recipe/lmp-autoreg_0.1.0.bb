SUMMARY = "First-boot registration of an LmP device with its FoundriesFactory"
DESCRIPTION = "lmp-autoreg replaces the lmp-device-auto-register shell script: \
               a Python agent and a hardened systemd unit that register the device \
               with the Foundries API or with a factory's own registration server, \
               then start the update client."
# Placeholders until the project has a public home: see docs/adopting.md.
HOMEPAGE = "https://git.example.com/lmp-autoreg"
BUGTRACKER = "https://git.example.com/lmp-autoreg/issues"
SECTION = "devel/python"
LICENSE = "BSD-3-Clause"
LIC_FILES_CHKSUM = "file://LICENSE;md5=027b40e2873ae93f89269c7b6ffc02fb"
CVE_PRODUCT = "lmp-autoreg"

# For the Yocto series that meta-lmp main declares, wrynose (openembedded-core and
# meta-openembedded wrynose, bitbake 2.18): docs/adopting.md says how to check it there.

# The repository of this project and the commit to build. A factory points both at the
# mirror it builds from and the commit it has tested (docs/adopting.md). Here SRCREV is a
# commit of main; tests/test_integration_files.py checks it is an ancestor of HEAD.
LMP_AUTOREG_GIT_URI ?= "git://git.example.com/lmp-autoreg.git;protocol=https;branch=main"
PV = "0.1.0+git"
SRC_URI = "${LMP_AUTOREG_GIT_URI}"
SRCREV = "8410184e8d3b6229617655971c8c9b04c21258a4"

inherit python_setuptools_build_meta systemd

# What lands in /etc/default/lmp-device-auto-register (see lmp_autoreg_settings below).
# Registration URL; empty: the agent's default, the Foundries API.
LMP_AUTOREG_DEVICE_API ?= ""
# Non-empty: production devices (no API token, businessCategory=production in the CSR).
LMP_AUTOREG_PRODUCTION ?= ""
# Non-empty: the device name is /etc/hostname instead of the uuid.
LMP_AUTOREG_USE_HOSTNAME ?= ""
# Services started once registered, comma separated; empty: none.
LMP_AUTOREG_START_SERVICES ?= "aktualizr-lite,fioconfig"
# fioconfig check-in after registering: auto, on or off.
LMP_AUTOREG_FIOCONFIG ?= "auto"
# Non-empty: power off after a successful registration.
LMP_AUTOREG_POWEROFF ?= ""
# API token with the devices:create scope, for development and CI images only: it is
# installed as the device's token file when set, unless LMP_AUTOREG_PRODUCTION is set.
LMP_DEVICE_REGISTER_TOKEN ?= ""

def lmp_autoreg_settings(d):
    """The KEY=VALUE lines that the recipe variables add to the default file."""
    lines = []
    api = (d.getVar("LMP_AUTOREG_DEVICE_API") or "").strip()
    if api:
        lines.append("DEVICE_API=" + api)
    # The agent treats PRODUCTION set to anything, even empty, as production:
    # the line is written only for production images.
    if d.getVar("LMP_AUTOREG_PRODUCTION"):
        lines.append("PRODUCTION=1")
    if d.getVar("LMP_AUTOREG_USE_HOSTNAME"):
        lines.append("USE_HOSTNAME=1")
    # Only what differs from the agent's own defaults: the file then shows the image's
    # choices, and nothing else for a reader to wonder about.
    services = (d.getVar("LMP_AUTOREG_START_SERVICES") or "").strip()
    if services != "aktualizr-lite,fioconfig":
        lines.append("START_SERVICES=" + services)
    fioconfig = (d.getVar("LMP_AUTOREG_FIOCONFIG") or "").strip() or "auto"
    if fioconfig != "auto":
        lines.append("FIOCONFIG=" + fioconfig)
    if d.getVar("LMP_AUTOREG_POWEROFF"):
        lines.append("POWEROFF=1")
    return lines

def lmp_autoreg_token(d):
    """The API token to install, or "" for none.

    A token lets whoever holds the image create devices in the factory. It belongs in
    development and CI images only, so a production image never gets one, even when a
    token is configured (a CI token set in a shared configuration must not leak).
    """
    token = (d.getVar("LMP_DEVICE_REGISTER_TOKEN") or "").strip()
    if not token:
        return ""
    if d.getVar("LMP_AUTOREG_PRODUCTION"):
        bb.warn("LMP_DEVICE_REGISTER_TOKEN is not installed: LMP_AUTOREG_PRODUCTION is set")
        return ""
    return token

do_install:append() {
    install -D -m 0644 ${S}/systemd/lmp-device-auto-register.service \
        ${D}${systemd_system_unitdir}/lmp-device-auto-register.service
    install -D -m 0644 ${S}/systemd/lmp-device-auto-register.default \
        ${D}${sysconfdir}/default/lmp-device-auto-register
    install -D -m 0644 ${S}/systemd/lmp-autoreg.tmpfiles \
        ${D}${nonarch_libdir}/tmpfiles.d/lmp-autoreg.conf
}

python lmp_autoreg_install_settings() {
    import os
    default_file = d.expand("${D}${sysconfdir}/default/lmp-device-auto-register")
    with open(default_file, "a") as f:
        for line in lmp_autoreg_settings(d):
            f.write(line + "\n")
    token = lmp_autoreg_token(d)
    if token:
        token_file = d.expand("${D}${sysconfdir}/lmp-device-register-token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
}
lmp_autoreg_install_settings[doc] = "Write the recipe's settings and, for non-production images, the API token"
do_install[postfuncs] += "lmp_autoreg_install_settings"

SYSTEMD_SERVICE:${PN} = "lmp-device-auto-register.service"
FILES:${PN} += "${nonarch_libdir}/tmpfiles.d/lmp-autoreg.conf"

# What the package imports, by the python3 package that holds it. python3-core: most of the
# standard library it uses (argparse, os, pathlib, shutil, subprocess, ...). python3-datetime:
# the clock check. python3-fcntl: the registration lock. python3-io: socket (sd_notify
# without systemd-python), ssl and tempfile (demo, test kit). python3-json, python3-logging,
# python3-tomllib: their modules. python3-netclient: base64 (the key's PEM) and http (the
# loopback server of demo and the test kit). python3-netserver: socketserver, under
# http.server. random (retry jitter) is in python3-math, which python3-io and
# python3-netclient depend on. python3-requests: HTTP. python3-cryptography: key, CSR,
# certificates. python3-systemd: journal fields and sd_notify.
RDEPENDS:${PN} += "python3-core \
                   python3-cryptography \
                   python3-datetime \
                   python3-fcntl \
                   python3-io \
                   python3-json \
                   python3-logging \
                   python3-netclient \
                   python3-netserver \
                   python3-requests \
                   python3-systemd \
                   python3-tomllib \
"
# HSM mode of the native backend (a PKCS#11 token, /etc/sota/hsm): python-pkcs11, packaged
# by meta-python as python3-pkcs11 (0.7.0 in wrynose; the agent works with 0.7 and newer).
# Recommended, so that an image without an HSM can leave it out (BAD_RECOMMENDATIONS).
RRECOMMENDS:${PN} += "python3-pkcs11"

# Replaces the shell-script package: same command, unit and token file.
RPROVIDES:${PN} += "lmp-device-auto-register"
RREPLACES:${PN} += "lmp-device-auto-register"
RCONFLICTS:${PN} += "lmp-device-auto-register"

# A device agent with a systemd unit: there is no native or nativesdk variant.
BBCLASSEXTEND = ""
