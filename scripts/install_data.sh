#!/usr/bin/env bash
# Installs Fashion-MNIST from Debian's dataset-fashion-mnist package (needs root or sudo).
# Without Debian: `swd pretrain data.download=true` fetches the files from the public mirror.
set -euo pipefail
if [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then exit 0; fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
