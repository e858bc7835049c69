# psss-ioc boot script. Start the IOC with exactly one command, from the repository top:
#
#     psss-ioc run --st-cmd iocBoot/iocpsss/st.cmd
#
# psss-ioc runs this file through the EPICS iocsh before iocInit; the records themselves are
# built from psss_ioc/ioc/pvs.py. Options given on the psss-ioc command line win over these values.
# $(ST_DIR) is the directory of this file.

# Record prefix: records are $(PSSS_PREFIX):<NAME>, iocStats under $(PSSS_PREFIX):IOC:
epicsEnvSet("PSSS_PREFIX", "SARFE10-PSSS059")
# Camera image stream (bsread, PULL or SUB) and the output stream port
epicsEnvSet("PSSS_INPUT_STREAM", "tcp://sf-daqsync-02:9000")
epicsEnvSet("PSSS_INPUT_MODE", "PULL")
epicsEnvSet("PSSS_OUTPUT_PORT", "8889")
# Output channel names: "v1.8" as psss_processing 1.8.0 sent them, which the data store's
# channel configuration uses ($(PSSS_PREFIX):SPECTRUM_Y, ...; the image in its own stream on
# port 8890); "document" as its README names them ($(PSSS_PREFIX):FPICTURE.spectrum, ...)
epicsEnvSet("PSSS_OUTPUT_NAMES", "v1.8")
# Legacy REST API of psss_processing (PsssProcessingClient, port 12000). 127.0.0.1 serves this
# host only; "0.0.0.0" opens it to the network (as psss_processing did); port "0" turns it off.
# Protect writes with `--rest-token` (or PSSS_REST_TOKEN in the environment file) when open.
epicsEnvSet("PSSS_REST_HOST", "127.0.0.1")
epicsEnvSet("PSSS_REST_PORT", "12000")
# Settings (ROI, axis, background file, ...) survive restarts, saved by default in
# $STATE_DIRECTORY (systemd), else ~/.local/state/psss-ioc/<prefix>; another place:
#epicsEnvSet("PSSS_AUTOSAVE_DIR", "/var/lib/psss-ioc/autosave")
# Channel Access: spectra and axes are waveforms of up to 8192 doubles
epicsEnvSet("EPICS_CA_MAX_ARRAY_BYTES", "40000000")

# Access security: who may write the settings, who may restart the IOC. Hosts are checked by
# address (psss-ioc sets this anyway, and $(IOC_HOST) in the file to this host's name; without
# a file the built-in one leaves the settings writable from every host).
var("asCheckClientIP", "1")
asSetFilename("$(ST_DIR)/psss.acf")

# Extra record databases, if any, go here, e.g.
# dbLoadRecords("$(ST_DIR)/../../db/extra.db", "P=$(PSSS_PREFIX)")
