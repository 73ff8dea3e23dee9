# ser on the official Ray image: the `ser` command line, the labeling and training jobs, and the shipped models.
#
#   CPU:  docker build -t ser .
#   GPU:  docker build --build-arg RAY_IMAGE_TAG=2.60.0-py311-gpu --build-arg EXTRAS='[gpu]' -t ser:gpu .
#   run:  docker run --rm -v "$PWD/recordings:/data" -v "$PWD/labels:/out" ser label /data --output /out
#
# The same image serves as the KubeRay head/worker image (deploy/kuberay/): KubeRay replaces the entrypoint.
ARG RAY_IMAGE_TAG=2.60.0-py311-cpu
FROM rayproject/ray:${RAY_IMAGE_TAG}

# Extras of pyproject.toml: "" for CPU, "[gpu]" for TensorFlow's CUDA libraries (with a -gpu RAY_IMAGE_TAG),
# "[app]" for the web demo (`ser app --address 0.0.0.0`), or both: "[gpu,app]".
ARG EXTRAS=""

# The base image's non-root user `ray` (uid 1000, group users = gid 100).
USER 1000:100

# Installed as the README installs it (editable), so the code finds models/ and configs/ beside it. COPY makes
# the folder owned by `ray` (WORKDIR would make it root's); its name is no package name, so `import ser` from
# /home/ray cannot pick up the folder itself.
COPY --chown=1000:100 pyproject.toml README.md /home/ray/ser-project/
COPY --chown=1000:100 ser /home/ray/ser-project/ser
COPY --chown=1000:100 jobs /home/ray/ser-project/jobs
WORKDIR /home/ray/ser-project
RUN pip install --no-cache-dir -e ".${EXTRAS}"

COPY --chown=1000:100 configs ./configs
COPY --chown=1000:100 models ./models

EXPOSE 8501
ENTRYPOINT ["ser"]
CMD ["--help"]
