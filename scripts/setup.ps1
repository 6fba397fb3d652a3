# Creates (or reuses) the virtual environment and installs ovms-plugin into it: setup.sh's twin
# for Windows PowerShell 5.1 and PowerShell 7.
#   scripts\setup.ps1 [EXTRAS]     EXTRAS: comma list of convert,test, quoted (default: none)
# The work is scripts\setup.py's: the environment lives in
# %LOCALAPPDATA%\ovms-plugin\venvs\KEY, keyed by the dependency files; OVMS_PLUGIN_VENV names
# another place. Python 3.11 is $env:PYTHON, else the py launcher's 3.11 (py -3.11), else
# python. Prints the interpreter's path last.
param([string]$Extras = "")

$exe = "python"
$pre = @()
if ($env:PYTHON) {
    $exe = $env:PYTHON
} elseif (Get-Command py -ErrorAction SilentlyContinue) {
    $exe = "py"
    $pre = @("-3.11")
} elseif (Get-Command python3.11 -ErrorAction SilentlyContinue) {
    $exe = "python3.11"
}
# pip's output goes to stderr; stdout carries only the interpreter's path, last.
$out = & $exe @pre (Join-Path $PSScriptRoot "setup.py") $Extras
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
Write-Output ($out | Select-Object -Last 1)
exit 0
