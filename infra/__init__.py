"""The platform that the gateway (service/) and the workers (jobrunner/) share: settings, the
metadata database and its migrations, the job store, the blob store and the broker."""
