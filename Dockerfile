# vfio-device-plugin node agent.
#   docker build -t ghcr.io/vfio-device-plugin/vfio-device-plugin:0.1.0 .
# Stage 1 installs the package into a venv; stage 2 is the slim runtime and nothing else: no compilers,
# no pip, no caches. Resource names come from the pci.ids the package ships (deviceplugin/data/, newer
# than any distribution's copy; the newest copy found wins, and `inspect` says which).
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY deviceplugin/ deviceplugin/
# Bytecode is compiled here, once, and kept: every command in the pod (`kubectl exec ... inspect`) would
# otherwise compile every module it imports from source, each time. unchecked-hash: valid whatever the
# files' times after COPY, and the image never changes its sources.
RUN /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/pip uninstall -y pip setuptools \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} + \
 && /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv/lib

FROM python:3.11-slim-bookworm
# The base image ships the standard library without bytecode: compile it too (see above).
RUN rm -rf /usr/local/lib/python3.11/site-packages/pip /usr/local/bin/pip* \
 && python -m compileall -q -j 0 --invalidation-mode unchecked-hash "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Root without capabilities (the DaemonSet drops them all): the kubelet's device-plugin dir is root-owned.
USER 0
ENTRYPOINT ["vfio-device-plugin", "serve"]
