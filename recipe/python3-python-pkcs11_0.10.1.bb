SUMMARY = "PKCS#11 support for Python"
DESCRIPTION = "python-pkcs11 drives a PKCS#11 module (an HSM, a TPM through tpm2-pkcs11, \
               OP-TEE, SoftHSM) from Python. lmp-autoreg uses it to generate the device \
               key on the token and have the token sign the registration request."
HOMEPAGE = "https://github.com/pyauth/python-pkcs11"
BUGTRACKER = "https://github.com/pyauth/python-pkcs11/issues"
SECTION = "devel/python"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://LICENSE;md5=f68bda54505b4002e6ec86e08125ef79"
CVE_PRODUCT = "python-pkcs11"

# A Cython extension; setuptools-scm gives it its version. The sdist's build-system asks
# for setuptools 80.8 or newer (docs/adopting.md, section 6).
DEPENDS += "python3-cython-native python3-setuptools-scm-native"

# The sdist is named with an underscore.
PYPI_ARCHIVE_NAME = "python_pkcs11-${PV}.tar.gz"
SRC_URI[sha256sum] = "e0d7ccede3b3145a678d7c8c59b3c64dcebeb77c9146ad3394a4b1309c4ab2a2"

inherit pypi python_setuptools_build_meta

S = "${WORKDIR}/python_pkcs11-${PV}"

# python3-asn1crypto (meta-python): its only Python dependency.
RDEPENDS:${PN} += "python3-asn1crypto python3-core"

BBCLASSEXTEND = "native nativesdk"
