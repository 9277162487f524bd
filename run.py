# MaskAD in JAX from a clone: the same command as the installed `maskad-jax`. Its modes, configs, flags
# and exit statuses are maskad_jax/app/cli.py's docstring, which `python run.py --help` prints (this
# file has no docstring of its own, so that text is the help).
#
#     python run.py --config=configs/demo.py                      # the embedded default: runs anywhere

from maskad_jax.app.cli import console

if __name__ == "__main__":
    console()
